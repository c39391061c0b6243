"""What a run reports besides the label volume: lesion volumes (JSON, CSV) and a QC picture (PNG).

Array and spacing order. Every array is indexed ``[z, y, x]`` (SimpleITK's ``GetArrayFromImage``
order, index axes k, j, i) and ``spacing`` is given in the same order, ``(z, y, x)`` in mm, i.e.
``tuple(reversed(image.GetSpacing()))``.

Screen orientation of the QC picture (radiological convention, as in Slicer's slice views). The
arrays are first permuted/flipped so that their axes point to patient Superior, Posterior, Left
(LPS, the closest axes to the image's direction matrix; identity when no direction is known). Then

- axial (plane z = const): anterior up, patient right on the screen's left;
- coronal (plane y = const): superior up, patient right on the screen's left;
- sagittal (plane x = const): superior up, anterior on the screen's left.

Each panel carries these orientation letters at its edges, so a wrong direction matrix is visible.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .conventions import (LABEL_COLORS, LABEL_NAMES, LABEL_SETS, MODALITIES, MODALITY_DISPLAY_NAMES,
                          REGIONS, to_brats2021)
from .errors import OutputPathError
from .io import atomic_output

IDENTITY_DIRECTION: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
WINDOW_PERCENTILES = (1.0, 99.0)
OVERLAY_ALPHA = 0.35
# Decimals of ml written to the files: 1e-6 ml = 0.001 mm^3, far below any voxel.
VOLUME_DECIMALS = 6


# ----------------------------------------------------------------------------- volumes

def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(values)) or min(values) <= 0:
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return values  # type: ignore[return-value]


def _label_array(labels: np.ndarray | sitk.Image, label_set: str) -> np.ndarray:
    """Labels as an integer [z, y, x] array in BraTS 2021 numbering, checked against ``label_set``."""
    if label_set not in LABEL_SETS:
        raise ValueError(f"unknown label set {label_set!r}; use one of {sorted(LABEL_SETS)}")
    if isinstance(labels, sitk.Image):
        labels = sitk.GetArrayFromImage(labels)
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"labels must be a 3D [z, y, x] array, got shape {labels.shape}")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    elif not np.issubdtype(labels.dtype, np.integer):
        if not np.array_equal(labels, np.round(labels)):
            raise ValueError("labels hold non-integer values; give a label map, not probabilities")
        labels = labels.astype(np.int32)
    if label_set == "brats":
        labels = to_brats2021(labels)
    present = set(np.unique(labels).tolist())
    unknown = present - set(LABEL_SETS[label_set])
    if unknown:
        raise ValueError(f"label map holds values {sorted(unknown)} that label set {label_set!r} "
                         f"does not have (it has {list(LABEL_SETS[label_set])})")
    return labels


def _volumes_of(labels: np.ndarray, spacing: tuple[float, float, float], label_set: str) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.intp), minlength=max(LABEL_SETS[label_set]) + 1)
    volumes = {name: float(counts[value]) * voxel_ml for value, name in LABEL_NAMES[label_set].items()}
    if label_set == "brats":
        for region, values in REGIONS.items():
            volumes[region] = float(sum(counts[v] for v in values)) * voxel_ml
    return volumes


def lesion_volumes(labels: np.ndarray | sitk.Image, spacing: Sequence[float],
                   label_set: str = "brats") -> dict[str, float]:
    """Volume in ml of every sub-region (by name) and, for BraTS labels, of the regions WT, TC, ET.

    labels: [z, y, x] label map (BraTS 2021 numbering; ET = 3 of BraTS 2023 is accepted).
    spacing: (z, y, x) voxel size in mm. Volume = voxel count * voxel volume (mm^3) / 1000.
    """
    spacing = _check_spacing(spacing)
    return _volumes_of(_label_array(labels, label_set), spacing, label_set)


# ----------------------------------------------------------------------------- orientation

def _lps_axes(direction: Sequence[float]) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For target numpy axes (S, P, L): the source numpy axis and whether to flip it.

    ``direction`` is SimpleITK's row-major 3x3 matrix: column c is the LPS direction of index axis c
    (i, j, k = numpy axes 2, 1, 0). Oblique images get the closest axis-aligned view.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    # index axis c -> physical axis p, chosen as the permutation with the largest total alignment
    best = max(itertools.permutations(range(3)),
               key=lambda perm: sum(abs(matrix[perm[c], c]) for c in range(3)))
    sources, flips = [0, 0, 0], [False, False, False]
    for index_axis, physical_axis in enumerate(best):
        target = 2 - physical_axis          # physical L, P, S -> numpy axes 2, 1, 0
        sources[target] = 2 - index_axis    # index axis i, j, k -> numpy axes 2, 1, 0
        flips[target] = matrix[physical_axis, index_axis] < 0
    return tuple(sources), tuple(flips)  # type: ignore[return-value]


def orient_for_display(array: np.ndarray, spacing: Sequence[float],
                       direction: Sequence[float] | None = None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Permute/flip a [z, y, x] array so its axes point to Superior, Posterior, Left (LPS).

    Returns the view and its spacing in the new axis order. With ``direction=None`` the array is
    taken as LPS-aligned already (SimpleITK's identity direction), and returned unchanged.
    """
    sources, flips = _lps_axes(direction if direction is not None else IDENTITY_DIRECTION)
    view = np.transpose(array, sources)
    view = view[tuple(slice(None, None, -1) if flip else slice(None) for flip in flips)]
    return view, tuple(float(spacing[s]) for s in sources)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- QC picture

def _gather_images(images: Mapping[str, sitk.Image | np.ndarray | None], shape: tuple[int, ...],
                   spacing: tuple[float, float, float]) -> tuple[dict[str, np.ndarray], tuple[float, ...] | None]:
    unknown = set(images) - set(MODALITIES)
    if unknown:
        raise ValueError(f"unknown modality key(s) {sorted(unknown)}; use {list(MODALITIES)}")
    arrays: dict[str, np.ndarray] = {}
    direction = None
    for key in MODALITIES:
        value = images.get(key)
        if value is None:
            continue
        name = MODALITY_DISPLAY_NAMES[key]
        if isinstance(value, sitk.Image):
            image_spacing = tuple(reversed(value.GetSpacing()))
            if not np.allclose(image_spacing, spacing, rtol=1e-4):
                raise ValueError(f"{name} has spacing (z, y, x) {image_spacing} but spacing {spacing} was "
                                 "given; spacing is expected in [z, y, x] order")
            if direction is None:
                direction = tuple(value.GetDirection())
            value = sitk.GetArrayViewFromImage(value)
        array = np.asarray(value, dtype=np.float32)
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape} but the labels have {shape}; "
                             "resample the images onto the label grid first")
        arrays[key] = array
    if not arrays:
        raise ValueError("no image to show; give at least one of T1, T1CE, T2, FLAIR")
    return arrays, direction


def _window(array: np.ndarray) -> tuple[float, float]:
    """1-99 percentile window over the non-zero (brain) voxels, or all voxels if nearly all are zero."""
    values = array[array != 0]
    if values.size < 0.01 * array.size:
        values = array.ravel()
    if values.size > 2_000_000:  # a strided sample gives the same percentiles to display precision
        values = values[:: values.size // 1_000_000]
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def _overlay_rgba(labels_2d: np.ndarray, colors: Mapping[int, tuple[float, float, float]]) -> np.ndarray:
    rgba = np.zeros(labels_2d.shape + (4,), dtype=np.float32)
    for value, color in colors.items():
        mask = labels_2d == value
        rgba[mask, :3] = color
        rgba[mask, 3] = OVERLAY_ALPHA
    return rgba


# per view: numpy axis (of the S, P, L view) held constant, imshow origin, edge letters
# (top, bottom, left, right), and the spacing axes (rows, columns) for the physical aspect ratio
_VIEWS = (
    ("Axial", 0, "upper", ("A", "P", "R", "L"), (1, 2)),
    ("Coronal", 1, "lower", ("S", "I", "R", "L"), (0, 2)),
    ("Sagittal", 2, "lower", ("S", "I", "A", "P"), (0, 1)),
)
_INDEX_NAMES = ("k", "j", "i")  # numpy axes 0, 1, 2 of the input = ITK index axes k, j, i


def _render_qc(images: Mapping[str, sitk.Image | np.ndarray | None], labels: np.ndarray | sitk.Image,
               spacing: Sequence[float], label_set: str, title: str,
               direction: Sequence[float] | None):
    # Figure + Agg canvas directly: pyplot would select a global backend and keep figures alive.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    spacing = _check_spacing(spacing)
    label_array = _label_array(labels, label_set)
    arrays, image_direction = _gather_images(images, label_array.shape, spacing)
    direction = direction if direction is not None else image_direction
    volumes = _volumes_of(label_array, spacing, label_set)
    colors = {value: LABEL_COLORS[label_set][value] for value in LABEL_NAMES[label_set]}

    sources, flips = _lps_axes(direction if direction is not None else IDENTITY_DIRECTION)
    view_labels, view_spacing = orient_for_display(label_array, spacing, direction)
    shape = view_labels.shape
    lesion = np.argwhere(view_labels > 0)
    centre = (np.round(lesion.mean(axis=0)).astype(int) if lesion.size else np.array(shape) // 2)
    centre_input = [int(centre[t]) if not flips[t] else shape[t] - 1 - int(centre[t]) for t in range(3)]

    extent = [n * s for n, s in zip(shape, view_spacing)]  # mm along S, P, L
    widths = [extent[2], extent[2], extent[1]]
    row_height_mm = max(extent[1], extent[0])
    inch_per_mm = 8.4 / sum(widths)
    row_height = float(np.clip(row_height_mm * inch_per_mm, 1.6, 4.0))
    rows = len(arrays)
    header, footer = 0.95, 0.85
    fig = Figure(figsize=(9.0, rows * row_height + header + footer), dpi=100, facecolor="black")
    FigureCanvasAgg(fig)
    total_height = rows * row_height + header + footer
    grid = fig.add_gridspec(rows, 3, width_ratios=widths, left=0.06, right=0.99, wspace=0.04, hspace=0.08,
                            top=1 - header / total_height, bottom=footer / total_height)
    text = {"color": "white"}
    for row, (key, array) in enumerate(arrays.items()):
        view, _ = orient_for_display(array, spacing, direction)
        low, high = _window(view)
        for column, (name, axis, origin, letters, aspect_axes) in enumerate(_VIEWS):
            ax = fig.add_subplot(grid[row, column])
            ax.set_facecolor("black")
            index = [slice(None)] * 3
            index[axis] = int(centre[axis])
            picture, label_slice = view[tuple(index)], view_labels[tuple(index)]
            aspect = view_spacing[aspect_axes[0]] / view_spacing[aspect_axes[1]]
            ax.imshow(picture, cmap="gray", vmin=low, vmax=high, origin=origin, aspect=aspect,
                      interpolation="nearest")
            if label_slice.any():
                ax.imshow(_overlay_rgba(label_slice, colors), origin=origin, aspect=aspect, interpolation="nearest")
                for value, color in colors.items():
                    mask = label_slice == value
                    if mask.any():
                        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            for (x, y, ha, va), letter in zip(((0.5, 0.98, "center", "top"), (0.5, 0.02, "center", "bottom"),
                                               (0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center")),
                                              letters):
                ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, fontsize=8, color="#ffcc66")
            if row == 0:  # on the grid cell, not the axes: axes shrink to their picture's aspect
                cell = grid[0, column].get_position(fig)
                held = sources[axis]
                fig.text((cell.x0 + cell.x1) / 2, cell.y1 + 0.08 / total_height,
                         f"{name} ({_INDEX_NAMES[held]} = {centre_input[axis]})", ha="center", va="bottom",
                         fontsize=10, **text)
            if column == 0:
                ax.set_ylabel(MODALITY_DISPLAY_NAMES[key], fontsize=11, **text)

    where = "through the lesion's centre of mass" if lesion.size else "through the volume centre (no lesion)"
    fig.text(0.5, 1 - 0.24 / total_height, title or "Segmentation QC", ha="center", va="center", fontsize=13,
             **text)
    fig.text(0.5, 1 - 0.5 / total_height,
             f"slices {where}; voxel {spacing[2]:.2f} x {spacing[1]:.2f} x {spacing[0]:.2f} mm (x, y, z); "
             "radiological view (patient right on screen left)", ha="center", va="center", fontsize=8,
             color="#bbbbbb")
    handles = [Patch(facecolor=(*colors[value], 0.6), edgecolor=colors[value],
                     label=f"{name}: {volumes[name]:.2f} ml") for value, name in LABEL_NAMES[label_set].items()]
    fig.legend(handles=handles, loc="center", bbox_to_anchor=(0.5, 0.55 * footer / total_height),
               ncol=len(handles), frameon=False, fontsize=10, labelcolor="white", handlelength=1.4)
    if label_set == "brats":
        fig.text(0.5, 0.2 * footer / total_height,
                 "   ".join(f"{region} {volumes[region]:.2f} ml" for region in REGIONS),
                 ha="center", va="center", fontsize=9, color="#dddddd")
    return fig


def _save_png(fig, path: Path) -> None:
    fig.savefig(str(path), format="png", facecolor=fig.get_facecolor(), metadata={"Software": None})


@contextlib.contextmanager
def _output_errors():
    """Report an operating-system failure while writing (disk full, permission) as OutputPathError."""
    try:
        yield
    except OSError as error:
        where = f" {error.filename}" if getattr(error, "filename", None) else ""
        raise OutputPathError(f"could not write{where}: {error.strerror or error}; check free space and "
                              "permissions of the output folder, or choose another one") from error


def _write_together(writers: Mapping[Path, Callable[[Path], None]]) -> None:
    """Write several files so that either all of them appear or none does.

    Every file goes to its temporary name first; the renames happen only after all writes succeeded.
    """
    with _output_errors(), contextlib.ExitStack() as stack:
        temporaries = {path: stack.enter_context(atomic_output(path)) for path in writers}
        for path, write in writers.items():
            write(temporaries[path])


def write_qc_picture(images: Mapping[str, sitk.Image | np.ndarray | None], labels: np.ndarray | sitk.Image,
                     spacing: Sequence[float], path: str | os.PathLike, label_set: str = "brats",
                     title: str = "", direction: Sequence[float] | None = None) -> Path:
    """Write a PNG for a quick visual check of a segmentation.

    One row per given modality (T1, T1CE, T2, FLAIR order); columns axial, coronal, sagittal through
    the lesion's centre of mass (the volume centre when there is no lesion); greyscale with a 1-99
    percentile window; each sub-region as a semi-transparent fill with a contour in its BraTS colour;
    a legend with the volumes in ml. Pixels have their physical aspect ratio.

    images: modality key -> [z, y, x] array or sitk.Image, all on the labels' grid.
    labels: [z, y, x] label map; spacing: (z, y, x) in mm.
    direction: the grid's SimpleITK direction (9 numbers) used to show the views in radiological
        orientation (see the module docstring); default: the first sitk.Image's, else identity.
    """
    path = Path(path)
    fig = _render_qc(images, labels, spacing, label_set, title, direction)
    _write_together({path: lambda temporary: _save_png(fig, temporary)})
    return path


# ----------------------------------------------------------------------------- volume files

def _jsonable(value):
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _volume_writers(volumes: Mapping[str, float], json_path: Path, csv_path: Path,
                    extra: Mapping | None) -> dict[Path, Callable[[Path], None]]:
    extra = dict(extra or {})
    if "volumes_ml" in extra:
        raise ValueError("extra must not contain the key 'volumes_ml'; it holds the volumes")
    rounded = {str(name): round(float(value), VOLUME_DECIMALS) for name, value in volumes.items()}
    payload = {**extra, "volumes_ml": rounded}

    def write_json(temporary: Path) -> None:
        temporary.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n", encoding="utf-8")

    def write_csv(temporary: Path) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "volume_ml"])
            writer.writerows(rounded.items())

    return {Path(json_path): write_json, Path(csv_path): write_csv}


def write_volume_report(volumes: Mapping[str, float], json_path: str | os.PathLike, csv_path: str | os.PathLike,
                        extra: Mapping | None = None) -> tuple[Path, Path]:
    """Write the volumes as JSON (``{**extra, "volumes_ml": {name: ml}}``) and CSV (``name,volume_ml``).

    ``extra`` holds run facts (method, case, input files, device, timings...); values JSON cannot
    hold (paths, numpy scalars) are converted. Volumes are written rounded to 6 decimals of ml.
    Both files appear together or not at all.
    """
    writers = _volume_writers(volumes, Path(json_path), Path(csv_path), extra)
    _write_together(writers)
    return Path(json_path), Path(csv_path)


def write_report(out_dir: str | os.PathLike, images: Mapping[str, sitk.Image | np.ndarray | None],
                 labels: np.ndarray | sitk.Image, spacing: Sequence[float], label_set: str = "brats",
                 case_id: str = "case", extra: Mapping | None = None,
                 direction: Sequence[float] | None = None) -> dict[str, Path]:
    """Write ``<case_id>_qc.png``, ``<case_id>_volumes.json`` and ``<case_id>_volumes.csv`` into ``out_dir``.

    The folder must exist. All three files appear together or none does (OutputPathError on failure).
    Returns ``{"qc": png, "json": json, "csv": csv}``. Arguments as in ``write_qc_picture``.
    """
    out_dir = Path(out_dir)
    if not case_id or Path(case_id).name != case_id or case_id in (".", ".."):
        raise OutputPathError(f"case id {case_id!r} is not a plain file name; it must not hold a path")
    spacing = _check_spacing(spacing)
    volumes = lesion_volumes(labels, spacing, label_set)
    method = (extra or {}).get("method")
    title = f"{case_id} - {method}" if method else case_id
    fig = _render_qc(images, labels, spacing, label_set, title, direction)
    paths = {"qc": out_dir / f"{case_id}_qc.png", "json": out_dir / f"{case_id}_volumes.json",
             "csv": out_dir / f"{case_id}_volumes.csv"}
    info = {"case": case_id, "label_set": label_set, "spacing_zyx_mm": list(spacing), **(extra or {})}
    writers = {paths["qc"]: lambda temporary: _save_png(fig, temporary),
               **_volume_writers(volumes, paths["json"], paths["csv"], info)}
    _write_together(writers)
    return paths
