"""Draw the BrainLesionSAM icon (128x128 RGBA PNG) and write it where Slicer and the extension index look.

A stylised axial MRI slice (anterior up) on a dark rounded tile, with a lesion drawn in the BraTS
colours: green peritumoral edema, a yellow enhancing rim and a red necrotic core.

    PYTHONPATH=. .venv/bin/python scripts/make_icon.py

writes ``BrainLesionSAM.png`` (repo root, EXTENSION_ICONURL) and
``BrainLesionSAM/Resources/Icons/BrainLesionSAM.png`` (the module icon), byte-identical.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse, FancyBboxPatch, Polygon

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from BrainLesionSAMLib.conventions import ED, ET, LABEL_COLORS, NCR  # noqa: E402
from BrainLesionSAMLib.io import atomic_output  # noqa: E402

SIZE = 128
TARGETS = (ROOT / "BrainLesionSAM.png", ROOT / "BrainLesionSAM" / "Resources" / "Icons" / "BrainLesionSAM.png")


def blob(centre: tuple[float, float], radius: float, wobble: float, phase: float, points: int = 90) -> np.ndarray:
    """Closed smooth irregular outline: a circle whose radius varies with a few harmonics."""
    angle = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = radius * (1 + wobble * (0.6 * np.sin(3 * angle + phase) + 0.4 * np.cos(5 * angle + 2 * phase)))
    return np.column_stack([centre[0] + r * np.cos(angle), centre[1] + r * np.sin(angle)])


def brain_outline(centre: tuple[float, float], half_width: float, half_height: float, folds: float,
                  lobes: int, points: int = 240) -> np.ndarray:
    """An axial brain outline: an ellipse widened posteriorly, its edge folded into gyri."""
    angle = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = 1 + folds * np.cos(lobes * angle)
    y = half_height * np.sin(angle) * r
    x = half_width * np.cos(angle) * r * (1 - 0.08 * np.sin(angle))  # anterior (top) a little narrower
    return np.column_stack([centre[0] + x, centre[1] + y])


def draw_icon() -> bytes:
    fig = Figure(figsize=(SIZE / 100, SIZE / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, SIZE)
    ax.set_ylim(0, SIZE)
    ax.set_aspect("equal")
    ax.axis("off")

    ax.add_patch(FancyBboxPatch((6, 6), SIZE - 12, SIZE - 12, boxstyle="round,pad=0,rounding_size=20",
                                facecolor="#17202b", edgecolor="#3d5a80", linewidth=2))
    centre = (64, 63)
    # scalp/skull ring; the brain inside is egg-shaped (wider at the back) with a folded (gyral) edge
    ax.add_patch(Ellipse(centre, 88, 106, facecolor="#3b444e", edgecolor="#d9dee4", linewidth=2.5))
    ax.add_patch(Polygon(brain_outline(centre, 38, 46, folds=0.025, lobes=16), closed=True, facecolor="#aab3bc",
                         edgecolor="#7d8792", linewidth=0.8))
    ax.add_patch(Polygon(brain_outline(centre, 28, 35, folds=0.1, lobes=12), closed=True, facecolor="#e4e8ec",
                         edgecolor="none"))  # white matter
    # interhemispheric fissure, front and back
    ax.plot([64, 64], [111, 90], color="#2a333d", linewidth=2.4, solid_capstyle="round")
    ax.plot([64, 64], [15, 32], color="#2a333d", linewidth=2.4, solid_capstyle="round")
    # lateral ventricles (the butterfly in the middle of an axial slice)
    for side in (1, -1):
        ax.add_patch(Ellipse((64 + side * 6, 64), 6, 24, angle=side * 10, facecolor="#46505a", edgecolor="none"))

    # the lesion, BraTS colours: edema (green) > enhancing rim (yellow) > necrotic core (red)
    lesion = (85, 80)
    ax.add_patch(Polygon(blob(lesion, 16, 0.13, 0.4), closed=True, facecolor=(*LABEL_COLORS["brats"][ED], 0.85),
                         edgecolor="#0b7a0b", linewidth=1.0))
    ax.add_patch(Polygon(blob(lesion, 10, 0.08, 1.3), closed=True, facecolor=LABEL_COLORS["brats"][ET],
                         edgecolor="#8a7a00", linewidth=0.8))
    ax.add_patch(Polygon(blob((lesion[0] + 0.5, lesion[1] - 0.5), 6, 0.1, 2.1), closed=True,
                         facecolor=LABEL_COLORS["brats"][NCR], edgecolor="none"))

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, transparent=True, metadata={"Software": None})
    return buffer.getvalue()


def main() -> int:
    png = draw_icon()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as temporary:
            temporary.write_bytes(png)
        target.chmod(0o644)
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
