"""Random contrast: per case and modality, a Gaussian-mixture intensity for every class.

Classes: six tissue sub-clusters (WM, GM and CSF, each split in two by a smooth random partition of
the head, FetalSynthSeg's sub-clusters), the skull-strip residue, enhancing vessels / dura on T1CE,
and the lesion compartments (necrosis, solid non-enhancing tumour, cyst fluid, oedema, enhancing
tumour). Each class draws a mean uniformly (SynthSeg) and a voxel-wise standard deviation.

Only the relations that *define* the BraTS sub-regions are kept (``constrain``):

- enhancing tumour is brighter on T1CE than every other class of the case, and brighter relative to
  white matter on T1CE than on T1 (it takes up contrast);
- oedema is hyperintense to white matter on T2 and FLAIR;
- necrosis (and cyst fluid) is darker than the enhancing rim on T1CE.

Everything else is random, including whether T1CE shares T1's tissue contrast (as after a real
injection, 3 cases in 4) or has a contrast of its own.
"""
from __future__ import annotations

import numpy as np

from BrainLesionSAMLib.conventions import MODALITIES

from .ranges import SynthesisRanges

TISSUE_CLASSES = ("wm_a", "wm_b", "gm_a", "gm_b", "csf_a", "csf_b", "residue", "vessel")
LESION_CLASSES = ("necrosis", "solid", "cyst", "edema", "enhancing")
CLASSES = TISSUE_CLASSES + LESION_CLASSES


def draw_contrast(rng: np.random.Generator, ranges: SynthesisRanges) -> dict[str, dict[str, tuple[float, float]]]:
    """{modality: {class: (mean, relative sd)}} obeying the BraTS-defining relations."""
    low, high = ranges.intensity
    means = {m: {c: float(rng.uniform(low, high)) for c in CLASSES} for m in MODALITIES}
    for m in MODALITIES:  # sub-clusters stay near their tissue's mean
        for tissue in ("wm", "gm", "csf"):
            means[m][f"{tissue}_b"] = means[m][f"{tissue}_a"] * float(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:  # a cyst is often plain fluid
        for m in MODALITIES:
            means[m]["cyst"] = means[m]["csf_a"] * float(rng.uniform(0.85, 1.15))
    if rng.random() < 0.75:  # T1CE = T1 plus contrast uptake
        for c in CLASSES:
            if c not in ("enhancing", "vessel"):
                means["t1ce"][c] = means["t1"][c] * float(rng.uniform(0.9, 1.1))
    constrain(means, rng)
    sd_low, sd_high = ranges.within_class_sd
    return {m: {c: (means[m][c], float(rng.uniform(sd_low, sd_high))) for c in CLASSES} for m in MODALITIES}


def constrain(means: dict[str, dict[str, float]], rng: np.random.Generator) -> None:
    """Impose the relations listed in the module docstring on drawn class means (in place)."""
    t1ce, t1 = means["t1ce"], means["t1"]
    for m in ("t2", "flair"):
        wm = 0.5 * (means[m]["wm_a"] + means[m]["wm_b"])
        means[m]["edema"] = max(means[m]["edema"], wm * float(rng.uniform(1.2, 2.2)))
    others = max(v for c, v in t1ce.items() if c not in ("enhancing", "vessel"))
    t1ce["enhancing"] = others * float(rng.uniform(1.15, 1.9))
    t1ce["vessel"] = t1ce["enhancing"] * float(rng.uniform(0.6, 1.05))
    wm_t1ce = 0.5 * (t1ce["wm_a"] + t1ce["wm_b"])
    wm_t1 = 0.5 * (t1["wm_a"] + t1["wm_b"])
    uptake = (t1ce["enhancing"] / wm_t1ce) / (t1["enhancing"] / wm_t1)
    if uptake < 1.3:
        t1["enhancing"] = t1ce["enhancing"] / wm_t1ce * wm_t1 / float(rng.uniform(1.3, 2.5))
    for c in ("necrosis", "cyst"):
        t1ce[c] = min(t1ce[c], t1ce["enhancing"] * float(rng.uniform(0.2, 0.75)))


def check_relations(means: dict[str, dict[str, float]]) -> list[str]:
    """The relations of the docstring that ``means`` break (empty when all hold): for tests."""
    broken = []
    t1ce, t1 = means["t1ce"], means["t1"]
    if any(t1ce["enhancing"] <= v for c, v in t1ce.items() if c not in ("enhancing", "vessel")):
        broken.append("ET not the brightest class on T1CE")
    uptake = (t1ce["enhancing"] / (t1ce["wm_a"] + t1ce["wm_b"])) / (t1["enhancing"] / (t1["wm_a"] + t1["wm_b"]))
    if uptake <= 1.0:
        broken.append("ET not brighter relative to WM on T1CE than on T1")
    for m in ("t2", "flair"):
        if means[m]["edema"] <= 0.5 * (means[m]["wm_a"] + means[m]["wm_b"]):
            broken.append(f"oedema not hyperintense to WM on {m}")
    if t1ce["necrosis"] >= t1ce["enhancing"] or t1ce["cyst"] >= t1ce["enhancing"]:
        broken.append("necrosis not darker than the enhancing rim on T1CE")
    return broken
