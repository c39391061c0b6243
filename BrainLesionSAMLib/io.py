"""Reading and writing images (SimpleITK), case discovery by file name, and safe (atomic) writes.

Every reader validates what a user can get wrong: the file is an image, it is 3D, it is not empty
or constant; NaN or infinite voxels are set to 0 with a warning. Every writer checks its folder
first (by creating a file there: os.access says yes to root everywhere), writes to a temporary name
beside the target and renames it into place only on success, so a failed or cancelled run leaves no
half-written file.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import struct
import zlib
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from .conventions import MODALITY_DISPLAY_NAMES
from .errors import InputImageError, InputWarning, OutputPathError

# File-name tokens per modality, checked in this order (t1ce before t1, t2f/flair before t2).
# Covers BraTS 2020/2021 (_t1ce), BraTS 2023+ (-t1c, -t1n, -t2w, -t2f) and common scanner names.
MODALITY_PATTERNS: tuple[tuple[str, str], ...] = (
    ("t1ce", r"t1ce|t1c|t1gd|t1\+c|t1post|t1_?contrast|ce_?t1"),
    ("flair", r"flair|t2f"),
    ("t2", r"t2w|t2"),
    ("t1", r"t1n|t1w|t1"),
)
LABEL_PATTERN = r"seg|label|mask|roi"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def modality_from_name(name: str) -> str | None:
    """Guess the modality key of a file or node name, or None. Tokens must stand alone
    (delimited by start/end, '_', '-', '.', or space), so 'patient_t1ce' is T1CE, not T1."""
    stem = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    tokens = re.split(r"[_\-. ]+", stem)
    for key, pattern in MODALITY_PATTERNS:
        if any(re.fullmatch(pattern, token) for token in tokens):
            return key
    return None


def _is_label_name(name: str) -> bool:
    stem = name.lower().split(".")[0]
    return any(re.fullmatch(LABEL_PATTERN, t) for t in re.split(r"[_\-. ]+", stem))


def discover_case(folder: str | os.PathLike) -> dict[str, Path]:
    """Map modality keys to image paths found in ``folder`` by their names.

    Also returns the ground-truth label map under the key ``'seg'`` when one is present.
    A DICOM series stored as a sub-folder named after its modality is found as well.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputImageError(f"case folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        is_image_file = entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES)
        if not (is_image_file or entry.is_dir()):
            continue
        if _is_label_name(entry.name):
            found.setdefault("seg", entry)
            continue
        key = modality_from_name(entry.name)
        if key is None:
            continue
        if key in found:
            raise InputImageError(
                f"two files in {folder} look like {MODALITY_DISPLAY_NAMES[key]}: "
                f"{found[key].name} and {entry.name}; pass the files explicitly with --{key}"
            )
        found[key] = entry
    return found


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D scalar volume from a file or a DICOM series folder and validate it.

    ``what`` names the input in error messages (e.g. 'FLAIR').
    """
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{what} file {path} does not exist; check the path")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames([str(f) for f in dicom_series_files(path, what)])
            image = reader.Execute()
        else:
            _check_nifti_complete(path, what)
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputImageError(
            f"{what} file {path} is not a readable image ({first_line}); "
            "give a NIfTI, NRRD, MHA file or a DICOM series folder") from None
    return validate_image(image, f"{what} ({path})")


def dicom_series_files(folder: str | os.PathLike, what: str = "image") -> list[Path]:
    """The files of the (first) DICOM series in ``folder``, in the order ``read_image`` stacks them:
    slice k of the volume it reads is file k (what a DICOM SEG maps its frames onto)."""
    folder = Path(folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputImageError(f"{what} folder {folder} contains no DICOM series; give a DICOM series folder "
                              "or an image file (NIfTI, NRRD, MHA)")
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0])]


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file must hold (offset + voxel data), or None if this is no NIfTI header."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    voxels = 1
    for extent in dims[1:1 + max(0, min(dims[0], 7))]:
        voxels *= max(int(extent), 1)
    return offset + voxels * bitpix // 8


def _check_nifti_complete(path: Path, what: str) -> None:
    """SimpleITK reads a truncated NIfTI without complaint and fills the rest with zeros; refuse it.

    A .nii.gz is decompressed once to its end (gzip raises on a cut stream), which costs a fraction
    of a second for a BraTS volume.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                header = stream.read(540)
                size = len(header)
                for block in iter(lambda: stream.read(1 << 22), b""):
                    size += len(block)
        else:
            with open(path, "rb") as stream:
                header = stream.read(540)
            size = path.stat().st_size
    except gzip.BadGzipFile:
        raise InputImageError(f"{what} file {path} is not a readable image (not gzip-compressed although "
                              "named .gz); give a NIfTI, NRRD, MHA file or a DICOM series folder") from None
    except (OSError, EOFError, zlib.error) as error:
        raise InputImageError(f"{what} file {path} is damaged or incomplete ({error}); "
                              "copy or export it again") from None
    expected = _nifti_expected_bytes(header)
    if expected is not None and size < expected:
        raise InputImageError(f"{what} file {path} is incomplete: {size} bytes where its header needs "
                              f"{expected}; copy or export it again")


def validate_image(image: sitk.Image, what: str = "image") -> sitk.Image:
    """Check that ``image`` is a usable 3D scalar volume; returns it as float32, with NaN and infinite
    voxels set to 0 (an :class:`InputWarning` says how many)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "give a single-channel (scalar) volume")
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    elif dimension != 3:
        raise InputImageError(
            f"{what} is {dimension}D (size {image.GetSize()}); a 3D volume is needed"
            + (" - split the 4D series and pass one volume" if dimension == 4 else ""))
    if min(image.GetSize()) < 2:
        raise InputImageError(f"{what} has size {image.GetSize()}; a 3D volume with at least "
                              "2 voxels along every axis is needed (is this a single 2D slice?)")
    image = sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayViewFromImage(image)
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        infinite = int(finite.size - finite.sum()) - nan
        cleaned = sitk.GetImageFromArray(np.where(finite, array, np.float32(0)))
        cleaned.CopyInformation(image)
        image, array = cleaned, sitk.GetArrayViewFromImage(cleaned)
        counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (infinite, "infinite")) if n)
        warnings.warn(f"{what} has {counts} voxel(s) (of {finite.size:,}); they were set to 0",
                      InputWarning, stacklevel=2)
    if float(array.max()) == float(array.min()):
        raise InputImageError(f"{what} is constant (every voxel {float(array.max())}); "
                              "it holds no image - check that the right file was exported")
    return image


def check_writable(path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Fail early, before any computation, if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise OutputPathError(f"output folder {parent} is a file; choose another path")
    if not parent.is_dir():
        raise OutputPathError(f"output folder {parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; give a file name for the output")
    _check_folder_writable(parent, f"output folder {parent}")
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path} already exists; choose another name or allow overwriting")
    return path


def _check_folder_writable(folder: Path, what: str) -> None:
    """os.access, then create and remove a file in ``folder`` (os.access says yes to root everywhere,
    even in /proc); ``what`` starts the message."""
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"{what} is not writable; choose another path")
    try:
        handle, probe = tempfile.mkstemp(prefix=".brainlesionsam-probe.", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise OutputPathError(f"{what} is not writable (creating a file there failed: "
                              f"{error.strerror or error}); choose another path") from None


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Fail early if ``folder`` cannot be created or written; creates nothing (a failed run leaves
    no empty folders behind). The folder may exist; its nearest existing parent must be writable."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"output folder {folder} cannot be created: {existing} is a file; "
                              "choose another path")
    _check_folder_writable(existing, f"output folder {folder}" if existing == folder
                           else f"output folder {folder} cannot be created: {existing}")
    return folder


def make_output_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) or raise an OutputPathError naming it."""
    folder = check_output_folder(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(f"output folder {folder} cannot be created ({error.strerror or error}); "
                              "choose another path") from None
    return folder


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, else delete it.

    The temporary name keeps the file's suffix so that writers choosing a format by extension work.
    """
    path = check_writable(path)
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=f".part{suffix}", dir=path.parent)
    except OSError as error:
        raise OutputPathError(f"output folder {path.parent} is not writable ({error.strerror or error}); "
                              "choose another path") from None
    os.close(handle)
    temporary_path = Path(temporary)
    try:
        yield temporary_path
        # mkstemp creates 0600 files; give the result the permissions an ordinary new file gets.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary_path, 0o666 & ~umask)
        os.replace(temporary_path, path)
    finally:
        if temporary_path.exists():
            temporary_path.unlink()


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` atomically (temporary file, then rename)."""
    path = Path(path)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(image, str(temporary), useCompression=compress)
        except RuntimeError as error:  # e.g. the disk is full; the temporary file is removed
            last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            raise OutputPathError(f"could not write {path} ({last_line}); check the free space and the "
                                  "file name's extension") from None
    return path


def copy_geometry(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a [z, y, x] array as an image on exactly ``reference``'s grid."""
    if tuple(reversed(array.shape)) != tuple(reference.GetSize()):
        raise ValueError(f"array shape {array.shape} does not match reference size {reference.GetSize()}")
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image
