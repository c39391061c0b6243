"""The parameter ranges of the training synthesiser, and the shifted ranges of the generalisation test.

Every random draw of a case is taken from one of these ranges; a test set made with
:data:`SHIFTED` draws its acquisition outside the training ranges (stronger bias, lower SNR,
thicker slices, larger rotations) so that a benchmark on it measures generalisation, not recall.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SynthesisRanges:
    """Ranges (low, high) of everything a case draws. Lengths in mm, angles in degrees."""

    # Anatomy: the MNI152 tissue maps under a random affine, an elastic warp and a left/right flip.
    rotation_deg: tuple[float, float] = (-20.0, 20.0)      # about each axis
    scale: tuple[float, float] = (0.85, 1.15)              # per axis
    shear: tuple[float, float] = (-0.08, 0.08)             # off-diagonal terms
    elastic_mm: tuple[float, float] = (0.0, 4.0)           # displacement amplitude (smooth, ~40 mm cells)
    flip_probability: float = 0.5
    brain_edge_mm: tuple[float, float] = (-1.5, 2.5)       # + shrinks the brain mask, - grows it (skull residue)
    spacing_mm: tuple[float, float] = (0.9, 2.0)           # output voxel size per axis (isotropic 1 mm 40 %)
    iso_1mm_probability: float = 0.4
    # Lesions.
    lesion_count: tuple[int, int] = (0, 4)                 # inclusive; 0 = a healthy case
    healthy_probability: float = 0.12
    volume_ml: tuple[float, float] = (0.1, 500.0)          # whole-lesion volume, log-uniform (glioblastomas with
                                                           # their oedema reach 300-500 ml; v2 stopped at 220)
    # Contrast: relative intensities of every class, drawn per case and modality.
    intensity: tuple[float, float] = (0.05, 1.0)
    within_class_sd: tuple[float, float] = (0.0, 0.08)     # voxel-wise, relative to the class mean
    # Acquisition.
    bias_strength: tuple[float, float] = (0.0, 0.4)        # field within exp(+-strength)
    snr: tuple[float, float] = (5.0, 60.0)                 # mean brain signal / noise sd, log-uniform
    blur_sigma_vox: tuple[float, float] = (0.0, 0.7)
    thick_slice_probability: float = 0.5
    slice_thickness_mm: tuple[float, float] = (1.0, 6.0)
    gamma_log_sd: float = 0.25                             # gamma = exp(N(0, sd))
    global_scale: tuple[float, float] = (10.0, 5000.0)     # raw scanner units, log-uniform
    global_offset: tuple[float, float] = (0.0, 0.2)        # fraction of the scale, inside the brain


TRAINING = SynthesisRanges()

# Outside the training ranges on every acquisition axis the benchmark reports separately.
SHIFTED = {
    "bias": replace(TRAINING, bias_strength=(0.55, 0.75)),
    "low_snr": replace(TRAINING, snr=(2.5, 4.5)),
    "thick_slices": replace(TRAINING, thick_slice_probability=1.0, slice_thickness_mm=(6.0, 8.0)),
    "rotation": replace(TRAINING, rotation_deg=(-30.0, 30.0)),
    "gamma": replace(TRAINING, gamma_log_sd=0.6),
}
