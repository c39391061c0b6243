"""Drive the page from headless Chromium (Playwright): start a server, open the page, pick a case,
Segment, draw and drag a box, Refine, Save - waiting on the page's state, never on fixed sleeps.
Used by the end-to-end test (Testing/test_web_e2e.py) and by ``python -m BrainLesionSAMWeb.browser``,
which measures page-ready, Segment and Refine times and the server's memory on a case folder.

Chromium is Debian's (``/usr/bin/chromium``), not a browser build downloaded by Playwright.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
READY_PATTERN = re.compile(r"serving (http://\S+/) .*pid (\d+)")
# The four views in the page's layout order (axial | 3D over sagittal | coronal).
VIEW_INDEX = {"axial": 0, "3d": 1, "sagittal": 2, "coronal": 3}


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    pid: int
    log: Path
    started_s: float

    def memory_mb(self) -> dict[str, float]:
        """Resident memory now and its peak (VmRSS, VmHWM), from /proc."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
        return values

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start_server(data_dir: Path, out_dir: Path, log: Path, idle_exit_s: float = 60, host: str = "127.0.0.1",
                 extra: tuple[str, ...] = (), timeout_s: float = 600, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> Server:
    """``brainlesionsam-web`` in a subprocess on a free port; returns once it prints its ready line.
    ``idle_exit_s`` makes it stop by itself once no page has been connected for that long; ``env``
    adds environment variables (e.g. another model catalogue) to this process's own."""
    command = [sys.executable, "-m", "BrainLesionSAMWeb.server", "--host", host, "--port", "0",
               "--data", str(data_dir), "--out", str(out_dir), "--idle-exit", str(idle_exit_s), *extra]
    start = time.perf_counter()
    with open(log, "wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=cwd, env={**os.environ, **(env or {})})
    while True:
        text = log.read_text(errors="replace")
        found = READY_PATTERN.search(text)
        if found:
            return Server(process, found.group(1), int(found.group(2)), log, time.perf_counter() - start)
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready:\n{text[-4000:]}")
        if time.perf_counter() - start > timeout_s:
            process.kill()
            raise RuntimeError(f"the server was not ready within {timeout_s} s:\n{text[-4000:]}")
        time.sleep(0.2)


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


class Page:
    """The BrainLesionSAM page in a Playwright page."""

    def __init__(self, page, timeout_s: float = 900):
        self.page = page
        self.timeout_ms = int(timeout_s * 1000)

    # -------------------------------------------------------------- state
    def phase(self) -> str:
        return self.page.locator("#blsam-panel").get_attribute("data-phase")

    def wait_phase(self, phase: str) -> None:
        self.page.wait_for_selector(f"#blsam-panel[data-phase='{phase}']", timeout=self.timeout_ms)

    def wait_text(self, selector: str, text: str) -> str:
        self.page.wait_for_function(
            "([selector, text]) => { const e = document.querySelector(selector); "
            "return e !== null && e.textContent.includes(text); }", arg=[selector, text], timeout=self.timeout_ms)
        return self.page.locator(selector).text_content()

    def text(self, selector: str) -> str:
        locator = self.page.locator(selector)
        return locator.text_content() if locator.count() else ""

    def open(self, url: str) -> float:
        """Seconds until the panel is idle and all four views show an image."""
        start = time.perf_counter()
        self.page.goto(url)
        self.wait_phase("idle")
        self.page.wait_for_function(
            "() => { const images = document.querySelectorAll('.remote-controlled-area img'); "
            "return images.length === 4 && [...images].every(i => i.complete && i.naturalWidth > 0); }",
            timeout=self.timeout_ms)
        return time.perf_counter() - start

    # -------------------------------------------------------------- controls
    def select(self, input_id: str, option: str | re.Pattern) -> None:
        """Open a Vuetify select (by the id of its input) and click the option with that name."""
        self.page.locator(f".v-select:has(#{input_id}) .v-field").click()
        self.page.get_by_role("option", name=option).click()

    def clear_select(self, input_id: str) -> None:
        self.page.locator(f".v-select:has(#{input_id}) .v-field__clearable .v-icon").click()

    def load_case(self, name: str) -> str:
        self.select("blsam-case", name)
        self.page.locator("#blsam-load").click()
        self.wait_text("#blsam-loaded-case", name)
        self.wait_phase("idle")
        return self.text("#blsam-message")

    def segment(self) -> float:
        """Click Segment and wait for the result; returns the seconds from the click."""
        return self._run_job("#blsam-segment")

    def refine(self) -> float:
        """Click Refine and wait for the result; returns the seconds from the click."""
        return self._run_job("#blsam-refine")

    def _run_job(self, button: str) -> float:
        """Click a job's button and wait until the panel is idle with a new message or an error."""
        before = self.text("#blsam-message")
        start = time.perf_counter()
        self.page.locator(button).click()
        self.page.wait_for_function(
            "(before) => { const p = document.querySelector('#blsam-panel'); "
            "const m = document.querySelector('#blsam-message'), e = document.querySelector('#blsam-error'); "
            "return p.dataset.phase === 'idle' && (e !== null || (m !== null && m.textContent !== before)); }",
            arg=before, timeout=self.timeout_ms)
        return time.perf_counter() - start

    def volume_table(self) -> dict[str, float]:
        rows = self.page.locator("#blsam-volumes tbody tr")
        return {rows.nth(i).get_attribute("data-segment"): float(rows.nth(i).locator(".blsam-ml").text_content())
                for i in range(rows.count())}

    def view_box(self, view: str) -> dict:
        return self.page.locator(".remote-controlled-area").nth(VIEW_INDEX[view]).bounding_box()

    def view_pixels(self, view: str, path: Path | None = None) -> np.ndarray:
        """The view as the page shows it now (a screenshot of its element), [h, w, 3] uint8."""
        from PIL import Image

        data = self.page.locator(".remote-controlled-area").nth(VIEW_INDEX[view]).screenshot(
            path=str(path) if path else None)
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def wait_view(self, view: str, condition, what: str, path: Path | None = None, timeout_s: float = 60):
        """Poll screenshots of the view until ``condition(pixels)`` holds (the views stream
        asynchronously); returns the pixels, saved to ``path`` when given."""
        deadline = time.perf_counter() + timeout_s
        while True:
            pixels = self.view_pixels(view, path)
            if condition(pixels):
                return pixels
            if time.perf_counter() > deadline:
                raise AssertionError(f"the {view} view never showed {what} within {timeout_s} s")
            self.page.wait_for_timeout(250)

    def click_view(self, x: float, y: float) -> None:
        mouse = self.page.mouse
        mouse.move(x - 2, y - 2)
        mouse.move(x, y)
        mouse.down()
        mouse.up()

    def box_text(self) -> str:
        return self.text("#blsam-box")

    def draw_box(self, view: str = "axial", half: float = 30) -> str:
        """Draw box, then click two opposite corners around the view's centre; returns the box text."""
        self.page.locator("#blsam-draw-box").click()
        self.wait_phase("placing-box")
        area = self.view_box(view)
        cx, cy = area["x"] + area["width"] / 2, area["y"] + area["height"] / 2
        self.click_view(cx - half, cy - half)
        self.wait_text("#blsam-box", "opposite corner")
        self.page.mouse.move(cx, cy, steps=4)
        self.click_view(cx + half, cy + half)
        self.wait_phase("idle")
        return self.wait_text("#blsam-box", "slices")

    def drag_box(self, dx: float, view: str = "axial") -> str:
        """Drag the box by its centre handle ``dx`` pixels to the right; returns the new box text."""
        before = self.box_text()
        area = self.view_box(view)
        cx, cy = area["x"] + area["width"] / 2, area["y"] + area["height"] / 2
        mouse = self.page.mouse
        mouse.move(cx - 1, cy - 1)
        mouse.move(cx, cy)
        mouse.down()
        self.page.wait_for_selector("#blsam-panel[data-box-dragging='true']", timeout=self.timeout_ms)
        mouse.move(cx + dx, cy, steps=8)
        mouse.up()
        self.page.wait_for_function(
            "(before) => { const e = document.querySelector('#blsam-box'); "
            "const p = document.querySelector('#blsam-panel'); "
            "return p.dataset.boxDragging === 'false' && e !== null && e.textContent !== before; }",
            arg=before, timeout=self.timeout_ms)
        return self.box_text()


def parse_box(text: str) -> tuple[int, ...]:
    """'x 68-85, y 54-71, z 44-60 (...)' -> (68, 54, 44, 85, 71, 60)."""
    found = re.search(r"x (\d+)-(\d+), y (\d+)-(\d+), z (\d+)-(\d+)", text)
    if not found:
        raise ValueError(f"no box in {text!r}")
    x0, x1, y0, y1, z0, z1 = (int(v) for v in found.groups())
    return x0, y0, z0, x1, y1, z1


def benchmark(case_dir: Path, out_dir: Path, box_half: float) -> dict:
    """One run of the whole flow on ``case_dir`` (a case folder inside a data folder)."""
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    server = start_server(case_dir.parent, out_dir, out_dir / "server.log", idle_exit_s=60)
    figures: dict = {"case": case_dir.name, "server_start_s": round(server.started_s, 1)}
    try:
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = Page(browser.new_page(viewport={"width": 1400, "height": 900}), timeout_s=3600)
            figures["page_ready_s"] = round(page.open(server.url), 2)
            figures["memory_after_open_mb"] = server.memory_mb()
            start = time.perf_counter()
            page.load_case(case_dir.name)
            figures["load_s"] = round(time.perf_counter() - start, 2)
            figures["segment_s"] = round(page.segment(), 2)
            figures["segment_message"] = page.text("#blsam-message") or page.text("#blsam-error")
            figures["volumes_ml"] = page.volume_table()
            page.page.screenshot(path=str(out_dir / "after_segment.png"))
            figures["box"] = page.draw_box(half=box_half)
            figures["refine_s"] = round(page.refine(), 2)
            figures["refine_message"] = page.text("#blsam-message") or page.text("#blsam-error")
            page.page.screenshot(path=str(out_dir / "after_refine.png"))
            figures["memory_mb"] = server.memory_mb()
            browser.close()
    finally:
        server.stop()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="page-ready, Segment and Refine times of the web page on a case")
    parser.add_argument("case_dir", type=Path, help="a case folder (its parent is served as --data)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the server log and screenshots")
    parser.add_argument("--box-half", type=float, default=30, help="half the box side, in screen pixels")
    args = parser.parse_args(argv)
    figures = benchmark(args.case_dir.resolve(), args.out.resolve(), args.box_half)
    print(json.dumps(figures, indent=2))
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
