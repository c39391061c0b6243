"""Finding the cases of a dataset folder, and case-level splits.

Layouts (the case folder's files are found by :func:`BrainLesionSAMLib.io.discover_case`, i.e. by
their names, so only the folder structure differs):

=============  =====================================================  ==============================
layout         case folder                                            files
=============  =====================================================  ==============================
brats2020      ``BraTS20_Training_001/``                              ``..._t1/_t1ce/_t2/_flair/_seg.nii.gz``, labels 1/2/4
brats2021      ``BraTS2021_00000/``                                   as 2020
brats2023      ``BraTS-GLI-00000-000/`` (also -MEN, -MET, -PED, -SSA)  ``-t1n/-t1c/-t2w/-t2f/-seg.nii.gz``, ET = 3
fcd2023        ``sub-00001/anat/`` (BIDS, also ``sub-*/ses-*/anat``)  ``..._T1w``, ``..._FLAIR``, ``..._FLAIR_roi`` (one lesion class)
sample         ``BLSAM_0000_000/`` (``brainlesionsam sample``)         as BraTS 2021
generic        any other sub-folder with modality files               found by name
=============  =====================================================  ==============================

Splits are made per **patient**, never per case or slice: a BraTS 2023 patient's time points
(``BraTS-GLI-00012-000`` and ``-001``) and a BIDS subject's sessions always land in the same set.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.errors import BrainLesionSAMError, InputImageError
from BrainLesionSAMLib.io import atomic_output, discover_case

LAYOUT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("brats2020", r"BraTS20_(Training|Validation)_\d+"),
    ("brats2021", r"BraTS2021_\d+"),
    ("brats2023", r"BraTS-[A-Za-z]+-\d+-\d+"),
    ("fcd2023", r"sub-[A-Za-z0-9]+"),
    ("sample", r"BLSAM_\d+_\d+"),
)


class DatasetError(BrainLesionSAMError):
    """A dataset folder holds no usable cases, or a split file does not fit the cases."""


@dataclass(frozen=True)
class CaseSource:
    """One case on disk: modality files, the label map (None when the case has none)."""

    case_id: str
    patient_id: str
    layout: str
    images: dict[str, Path]
    label: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.images)


def layout_of(name: str) -> str:
    for layout, pattern in LAYOUT_PATTERNS:
        if re.fullmatch(pattern, name):
            return layout
    return "generic"


def patient_of(case_id: str, layout: str) -> str:
    """The patient a case belongs to: BraTS 2023 ``BraTS-GLI-00012-001`` -> ``BraTS-GLI-00012``;
    BIDS ``sub-01_ses-02`` -> ``sub-01``; otherwise the case itself."""
    if layout == "brats2023":
        return case_id.rsplit("-", 1)[0]
    if layout == "fcd2023":
        return case_id.split("_ses-")[0]
    return case_id


def _bids_anat_folders(subject: Path) -> list[tuple[str, Path]]:
    found = []
    if (subject / "anat").is_dir():
        found.append((subject.name, subject / "anat"))
    for session in sorted(subject.glob("ses-*")):
        if (session / "anat").is_dir():
            found.append((f"{subject.name}_{session.name}", session / "anat"))
    return found


def find_cases(root: str | os.PathLike) -> list[CaseSource]:
    """Every case under ``root`` (one level of case folders, or BIDS subjects), sorted by id.

    Folders without any modality file are ignored (e.g. BIDS ``derivatives``); a case without a
    label map is returned with ``label=None`` (test sets). Raises DatasetError when nothing is found.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    cases: list[CaseSource] = []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        layout = layout_of(entry.name)
        folders = _bids_anat_folders(entry) if layout == "fcd2023" else [(entry.name, entry)]
        for case_id, folder in folders:
            try:
                found = discover_case(folder)
            except InputImageError as error:
                raise DatasetError(f"case {case_id}: {error}") from None
            images = {k: v for k, v in found.items() if k in MODALITIES}
            if not images:
                continue
            cases.append(CaseSource(case_id, patient_of(case_id, layout), layout, images, found.get("seg")))
    if not cases:
        raise DatasetError(
            f"no case folders with images in {root}. Expected one sub-folder per case, e.g. "
            "BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz, BraTS2021_00000/..._flair.nii.gz, "
            "BraTS-GLI-00000-000/...-t2f.nii.gz or BIDS sub-00001/anat/sub-00001_FLAIR.nii.gz; give the "
            "folder that holds the case folders")
    ids = [c.case_id for c in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DatasetError(f"case ids occur twice in {root}: {', '.join(duplicates)}")
    return cases


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------

def _partition(patients: list[str], fractions: list[float], rng: np.random.Generator) -> list[list[str]]:
    order = list(rng.permutation(len(patients)))
    n = len(patients)
    counts = [int(round(f * n)) for f in fractions]
    # Rounding must neither lose nor invent patients; the training set absorbs the difference,
    # and a non-zero fraction gets at least one patient when there are enough of them.
    for i in (1, 2):
        if fractions[i] > 0 and counts[i] == 0 and n >= 3:
            counts[i] = 1
    counts[0] = n - counts[1] - counts[2]
    if counts[0] < 1:
        raise DatasetError(f"{n} patient(s) are too few for the split fractions {fractions}")
    parts, start = [], 0
    for count in counts:
        parts.append(sorted(patients[i] for i in order[start:start + count]))
        start += count
    return parts


def make_splits(cases: list[CaseSource], seed: int = 0, fractions: list[float] | None = None,
                folds: int = 0) -> dict[str, Any]:
    """Case-level splits by patient, seeded.

    Returns {'seed', 'fractions', 'patients': {case: patient}, 'train', 'validation', 'test'} with
    case ids; with ``folds`` >= 2, train + validation are pooled and cut into k folds by patient:
    'folds' = [{'train': [...], 'validation': [...]}, ...] (fold i validates on part i), and
    'train' / 'validation' are fold 0's.
    """
    fractions = list(fractions or [0.7, 0.1, 0.2])
    rng = np.random.default_rng(seed)
    by_patient: dict[str, list[str]] = {}
    for case in cases:
        by_patient.setdefault(case.patient_id, []).append(case.case_id)
    patients = sorted(by_patient)
    train_p, validation_p, test_p = _partition(patients, fractions, rng)

    def expand(group: list[str]) -> list[str]:
        return sorted(c for p in group for c in by_patient[p])

    splits: dict[str, Any] = {
        "seed": seed, "fractions": fractions, "folds": folds,
        "patients": {c.case_id: c.patient_id for c in cases},
        "train": expand(train_p), "validation": expand(validation_p), "test": expand(test_p),
    }
    if folds >= 2:
        pool = sorted(train_p + validation_p)
        if len(pool) < folds:
            raise DatasetError(f"{len(pool)} patient(s) outside the test set are too few for {folds} folds")
        order = [pool[i] for i in rng.permutation(len(pool))]
        parts = [sorted(order[i::folds]) for i in range(folds)]
        splits["folds"] = [{"train": expand([p for j, part in enumerate(parts) if j != i for p in part]),
                            "validation": expand(parts[i])} for i in range(folds)]
        splits["train"], splits["validation"] = splits["folds"][0]["train"], splits["folds"][0]["validation"]
    check_splits(splits)
    return splits


def check_splits(splits: dict[str, Any]) -> None:
    """Raise DatasetError if a patient (or case) is in more than one set of any fold."""
    patients = splits.get("patients", {})
    sets = [{"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}]
    if isinstance(splits.get("folds"), list):
        sets += [{**fold, "test": splits["test"]} for fold in splits["folds"]]
    for group in sets:
        owner: dict[str, str] = {}
        for name, case_ids in group.items():
            for case in case_ids:
                patient = patients.get(case, case)
                if owner.setdefault(patient, name) != name:
                    raise DatasetError(f"patient {patient} (case {case}) is in both the {owner[patient]} and "
                                       f"the {name} set; a patient's cases must stay in one set")


def select_fold(splits: dict[str, Any], fold: int | None) -> dict[str, list[str]]:
    """{'train', 'validation', 'test'} case ids for ``fold`` (None or no folds: the plain split)."""
    folds = splits.get("folds")
    if isinstance(folds, list) and fold is not None:
        if not 0 <= fold < len(folds):
            raise DatasetError(f"fold {fold} does not exist; the split file has folds 0 to {len(folds) - 1}")
        return {"train": folds[fold]["train"], "validation": folds[fold]["validation"], "test": splits["test"]}
    return {"train": splits["train"], "validation": splits["validation"], "test": splits["test"]}


def write_splits(splits: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
    return path


def read_splits(path: str | os.PathLike, known_cases: list[str] | None = None) -> dict[str, Any]:
    """Read a split file; with ``known_cases``, every case it names must exist."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"split file {path} cannot be read: {error}") from None
    for key in ("train", "validation", "test"):
        if not isinstance(splits.get(key), list):
            raise DatasetError(f"split file {path} has no list '{key}'")
    check_splits(splits)
    if known_cases is not None:
        named = set(splits["train"]) | set(splits["validation"]) | set(splits["test"])
        unknown = sorted(named - set(known_cases))
        if unknown:
            raise DatasetError(f"split file {path} names {len(unknown)} case(s) that are not in the dataset "
                               f"(e.g. {', '.join(unknown[:3])}); it belongs to another dataset - delete it or "
                               "point data.splits elsewhere")
        missing = sorted(set(known_cases) - named)
        if missing:
            warnings.warn(f"{len(missing)} case(s) of the dataset are in no set of {path} (e.g. "
                          f"{', '.join(missing[:3])}); they are not used", stacklevel=2)
    return splits
