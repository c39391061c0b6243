"""The web page end to end in headless Chromium (Playwright driving Debian's /usr/bin/chromium) against
a real ``brainlesionsam-web`` server: pick a generated case, Segment with unet2d, check the lesion-volume
table against the library and a screenshot for the overlay, an error shown in the page, draw and drag a
box, Refine with litemedsam, Save, reload the files, the overwrite confirmation, four files opened in
the page - and the server stopping by itself once the page is gone. Waits are on the page's state
(``data-phase``, texts, what the views show), never fixed sleeps.

The tests run in file order on one page; the case is a generated 2 mm case cut to 6 axial slices.
"""
import ctypes.util
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need the 'playwright' package")
pytest.importorskip("trame_slicer", reason="the web front end needs the 'web' extra (trame-slicer)")
pytest.importorskip("slicer_layer_dm", reason="the web front end needs slicer-layer-dm (trame-slicer[standalone])")
if not Path("/usr/bin/chromium").exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium): no browser to test the page with",
                allow_module_level=True)
if ctypes.util.find_library("EGL") is None:
    pytest.skip("no EGL library (Debian: libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1): views cannot render",
                allow_module_level=True)

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "BrainLesionSAM"))
from BrainLesionSAMWeb.browser import Page, launch_browser, parse_box, start_server  # noqa: E402

from BrainLesionSAMLib.io import discover_case, read_image  # noqa: E402
from BrainLesionSAMLib.pipeline import load_and_segment  # noqa: E402
from BrainLesionSAMLib.report import lesion_volumes  # noqa: E402
from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case  # noqa: E402
from conftest import native_auto_precision  # noqa: E402

CASE_ID = "BLSAM_WEB_E2E"
IDLE_EXIT_S = 20
SCREENSHOTS = Path(os.environ.get("BLSAM_WEB_SCREENSHOTS", "")) if os.environ.get("BLSAM_WEB_SCREENSHOTS") else None


def green(pixels):
    """Edema overlay: green drawn at 50 % over grey (green at least 60 above red and blue)."""
    p = pixels.astype(int)
    return int(((p[..., 1] - p[..., 0] > 60) & (p[..., 1] - p[..., 2] > 60)).sum())


def red(pixels):
    p = pixels.astype(int)
    return int(((p[..., 0] - p[..., 1] > 60) & (p[..., 0] - p[..., 2] > 60)).sum())


def blue(pixels):
    """The box (ROI colour 0.2, 0.6, 1.0)."""
    p = pixels.astype(int)
    return int(((p[..., 2] - p[..., 0] > 60) & (p[..., 2] > 150)).sum())


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = SCREENSHOTS or tmp_path_factory.mktemp("web-screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    images = generate_case(SampleParameters.random(7, resolution=2))
    truth = sitk.GetArrayFromImage(images["seg"]) > 0
    centre = int(truth.sum(axis=(1, 2)).argmax())
    images = {key: image[:, :, centre - 3:centre + 3] for key, image in images.items()}
    folder = tmp_path_factory.mktemp("web-e2e-cases")
    write_case(images, folder, CASE_ID)
    return folder


def catalogue_with_an_unreachable_download(folder: Path) -> Path:
    """The packaged catalogue plus a medsam entry whose URL is a closed port on this machine: choosing it
    gives a job that fails as an offline user's download does (medsam itself ships no weights)."""
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = json.loads((REPOSITORY / "BrainLesionSAMLib" / "Models.json").read_text())
    data["models"].append({
        "id": "medsam-unreachable", "title": "MedSAM (test: unreachable download)", "version": "1",
        "method": "medsam", "config": {}, "file_name": "medsam_vit_b.pth",
        "url": f"http://127.0.0.1:{port}/medsam_vit_b.pth", "package": None, "origin": "a test server that is down",
        "sha256": "0" * 64, "size": 1000, "modalities": ["flair"], "required_modalities": ["flair"],
        "label_set": "lesion", "labels": [0, 1], "gpu_memory_gb": 1.0, "licence": "Apache-2.0",
        "description": "test entry"})
    path = folder / "Models.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("web-e2e-out")
    env = {"BRAINLESIONSAM_CATALOGUE": str(catalogue_with_an_unreachable_download(tmp_path_factory.mktemp("cat"))),
           "BRAINLESIONSAM_CACHE": str(tmp_path_factory.mktemp("cache"))}
    server = start_server(data_dir, out, out / "server.log", idle_exit_s=IDLE_EXIT_S, cwd=REPOSITORY, env=env)
    server.out, server.data_dir = out, data_dir
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = launch_browser(playwright)
        yield browser
        if browser.is_connected():
            browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    return Page(browser.new_page(viewport={"width": 1400, "height": 900}), timeout_s=900)


@pytest.fixture(scope="module")
def expected_volumes(data_dir):
    """The library's own unet2d result on the same files, for the page's volume table."""
    files = discover_case(data_dir / CASE_ID)
    images = {key: read_image(path) for key, path in files.items() if key != "seg"}
    with native_auto_precision():  # as the server's process picks it (bf16 on a CPU with native bf16)
        result = load_and_segment(images, "unet2d", device="cpu")
    spacing = tuple(reversed(images["t1ce"].GetSpacing()))
    return lesion_volumes(result.label_array, spacing, "brats")


def test_page_is_ready_with_segment_disabled_and_why(page, server, shots):
    seconds = page.open(server.url)
    print(f"page ready in {seconds:.1f} s; server started in {server.started_s:.1f} s; memory {server.memory_mb()}")
    assert page.page.locator("#blsam-segment").is_disabled()
    assert page.text("#blsam-segment-problem") == "load a case first"
    assert page.text("#blsam-method-modalities") == "any of T1, T1CE, T2, FLAIR"  # unet2d, the default
    assert page.page.locator("#blsam-refine").is_disabled()
    page.page.screenshot(path=str(shots / "01_ready.png"))


def test_case_picker_assigns_modalities_and_method_needs_are_explained(page, shots):
    message = page.load_case(CASE_ID)
    assert "assigned by name: T1, T1CE, T2, FLAIR" in message
    assert not page.page.locator("#blsam-segment").is_disabled()
    axial = page.wait_view("axial", lambda p: p.mean() > 10, "the FLAIR image", shots / "02_loaded_axial.png")
    assert green(axial) < 20 and red(axial) < 20, "an overlay before Segment"
    page.wait_view("3d", lambda p: np.ptp(p.reshape(-1, 3), axis=0).max() > 60,
                   "the slices in 3D (multisampling left on renders it empty)", shots / "02_loaded_3d.png")

    page.select("blsam-method", re.compile("^litemedsam"))
    page.wait_text("#blsam-method-modalities", "FLAIR required")
    assert "box" in page.wait_text("#blsam-segment-problem", "box")
    assert page.page.locator("#blsam-segment").is_disabled()
    page.clear_select("blsam-input-flair")
    assert "missing: FLAIR" in page.wait_text("#blsam-segment-problem", "missing: FLAIR")
    page.select("blsam-input-flair", f"{CASE_ID}_flair")
    page.wait_text("#blsam-segment-problem", "box")
    page.select("blsam-method", re.compile("^unet2d"))
    page.page.wait_for_selector("#blsam-segment:not([disabled])")


def test_segment_shows_the_volume_table_and_the_overlay(page, shots, expected_volumes):
    seconds = page.segment()
    message = page.text("#blsam-message")
    print(f"Segment (unet2d, 6 slices at 2 mm) in the page: {seconds:.1f} s - {message}")
    assert message.startswith("segmented with unet2d"), page.text("#blsam-error")
    assert page.page.locator("#blsam-cancel").is_disabled() and page.page.locator("#blsam-save").is_enabled()
    table = page.volume_table()
    assert list(table) == ["Necrotic core", "Edema", "Enhancing tumor", "WT", "TC", "ET"]
    assert table == pytest.approx({k: round(v, 2) for k, v in expected_volumes.items()}, abs=0.006)
    assert table["WT"] > 1.0
    axial = page.wait_view("axial", lambda p: green(p) > 300 and red(p) > 30, "the edema and necrosis overlay",
                           shots / "03_segmented_axial.png")
    assert green(axial) > 300
    page.wait_view("3d", lambda p: green(p) > 300, "the lesion surface", shots / "03_segmented_3d.png")
    page.page.screenshot(path=str(shots / "03_segmented.png"))


def test_a_failed_job_shows_its_error_and_changes_nothing(page):
    table = page.volume_table()
    box = page.draw_box(half=30)
    assert parse_box(box)
    page.select("blsam-method", re.compile("^medsam"))
    page.page.wait_for_selector("#blsam-segment:not([disabled])")
    page.segment()
    error = page.wait_text("#blsam-error", "medsam")
    assert "cannot download" in error and "medsam_vit_b.pth" in error, error
    assert page.volume_table() == table
    page.page.locator("#blsam-error .v-alert__close button").click()
    page.select("blsam-method", re.compile("^unet2d"))


def test_draw_drag_and_refine_inside_the_box(page, shots):
    first = parse_box(page.draw_box(half=30))  # a new box replaces the one of the previous test
    x0, y0, z0, x1, y1, z1 = first
    assert x1 > x0 and y1 > y0 and z1 - z0 + 1 <= 6
    moved = parse_box(page.drag_box(dx=16))
    shift = np.subtract(moved, first)
    assert shift[0] >= 3 and shift[3] >= 3, f"dragging right did not move the box right: {first} -> {moved}"
    assert abs(shift[0] - shift[3]) <= 1 and np.all(np.abs(shift[[1, 2, 4, 5]]) <= 2), f"{first} -> {moved}"
    page.wait_view("axial", lambda p: blue(p) > 30, "the box", shots / "04_box_axial.png")
    assert page.page.locator("#blsam-refine").is_enabled(), page.text("#blsam-refine-problem")
    table = page.volume_table()
    seconds = page.refine()
    message = page.text("#blsam-message")
    print(f"Refine (litemedsam, {z1 - z0 + 1} slices) in the page: {seconds:.1f} s - {message}")
    assert message.startswith("refined with litemedsam"), page.text("#blsam-error")
    assert page.page.locator("#blsam-cancel").is_disabled() and page.page.locator("#blsam-save").is_enabled()
    added, removed = (int(v) for v in re.search(r"(\d+) voxels added, (\d+) removed", message).groups())
    after = page.volume_table()
    assert after["Necrotic core"] == table["Necrotic core"] and after["Enhancing tumor"] == table["Enhancing tumor"]
    if added or removed:
        assert after["Edema"] != table["Edema"]
    page.page.screenshot(path=str(shots / "05_refined.png"))


def test_save_reload_and_the_overwrite_confirmation(page, server):
    table = page.volume_table()
    page.page.locator("#blsam-save").click()
    saved = page.wait_text("#blsam-saved", ".nii.gz")
    paths = [Path(p) for p in re.findall(r"(/\S+?\.(?:seg\.nrrd|nii\.gz))", saved)]
    assert [p.parent for p in paths] == [server.out, server.out] and all(p.is_file() for p in paths)
    # Reload both files beside the case's reference volume: the segments give the page's table back, and
    # the label map is the segments flattened (after a refinement segments may overlap; the later
    # BraTS label wins, so per-label volumes of the label map may differ - the whole tumour may not).
    import slicer
    from BrainLesionSAMSlicer import mrml
    scene = slicer.vtkMRMLScene()
    reference = mrml.addVolumeNodeFromImage(
        scene, read_image(server.data_dir / CASE_ID / f"{CASE_ID}_t1ce.nii.gz"), "t1ce")
    node = mrml.readSegmentationFile(scene, next(p for p in paths if p.name.endswith(".seg.nrrd")))
    volumes = mrml.segmentVolumes(node, reference)
    assert table == pytest.approx({k: round(v, 2) for k, v in volumes.items()}, abs=0.006)
    labels = sitk.ReadImage(str(next(p for p in paths if p.name.endswith(".nii.gz"))))
    assert np.array_equal(sitk.GetArrayFromImage(labels), mrml.labelsFromSegmentation(node, reference)[0])
    reloaded = lesion_volumes(sitk.GetArrayFromImage(labels), tuple(reversed(labels.GetSpacing())), "brats")
    assert table["WT"] == pytest.approx(round(reloaded["WT"], 2), abs=0.006)

    stamps = [p.stat().st_mtime_ns for p in paths]
    page.page.locator("#blsam-save").click()
    page.wait_phase("confirm-overwrite")
    assert all(str(p) in page.text("#blsam-confirm") for p in paths)
    page.page.locator("#blsam-keep").click()
    assert "nothing was overwritten" in page.wait_text("#blsam-message", "nothing was overwritten")
    assert [p.stat().st_mtime_ns for p in paths] == stamps
    page.page.locator("#blsam-save").click()
    page.wait_phase("confirm-overwrite")
    page.page.locator("#blsam-overwrite").click()
    page.wait_text("#blsam-message", "saved")
    assert all(p.stat().st_mtime_ns != s for p, s in zip(paths, stamps))


def test_four_files_opened_in_the_page_replace_the_case(page, data_dir):
    files = [str(data_dir / CASE_ID / f"{CASE_ID}_{key}.nii.gz") for key in ("flair", "t1", "t1ce", "t2")]
    page.page.locator("input[type=file]:not([webkitdirectory])").set_input_files(files)
    message = page.wait_text("#blsam-message", "volume(s)")
    assert message == f"loaded {CASE_ID}: 4 volume(s); assigned by name: T1, T1CE, T2, FLAIR"
    page.wait_phase("idle")
    assert page.page.locator("#blsam-volumes").count() == 0  # the previous result went with its case
    assert not page.page.locator("#blsam-segment").is_disabled()


def test_server_stops_by_itself_once_the_page_is_gone(page, server, browser):
    print(f"server memory: {server.memory_mb()}")
    browser.close()
    start = time.perf_counter()
    try:
        server.process.wait(IDLE_EXIT_S + 60)
    except Exception:  # noqa: BLE001 - reported below; the fixture kills it
        pass
    assert server.process.returncode == 0, f"still running {time.perf_counter() - start:.0f} s after the page closed"
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    if SCREENSHOTS:
        shutil.copy(server.log, SCREENSHOTS / "server.log")
