"""Random acquisition, per modality: gamma, bias field, blur, thick slices, Rician noise, raw units.

Applied to the noise-free image in this order (the scanner's point-spread function and slice
profile come before the noise; skull stripping after it): gamma on the [0, 1]-scaled signal, a
smooth multiplicative bias ``exp(strength * g)`` with ``|g| <= 1``, Gaussian blur, thick slices
(a slice profile of FWHM = thickness along a random axis, every k-th slice kept and linearly
interpolated back: what resampling a 2D acquisition onto an isotropic grid does), Rician noise at
an SNR (mean brain signal / noise sd) drawn log-uniformly, then the brain mask and an arbitrary
global scale and offset (raw scanner units; normalising is the preprocessing's job).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from BrainLesionSAMLib.sample import spatial_noise

from .anatomy import Grid
from .ranges import SynthesisRanges


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def thick_slices(image: np.ndarray, axis: int, factor: float, sigma_vox: float) -> np.ndarray:
    """Blur along ``axis`` with the slice profile, keep every ``factor``-th slice, interpolate back."""
    blurred = ndimage.gaussian_filter1d(image, sigma_vox, axis=axis, mode="nearest")
    n = image.shape[axis]
    kept = np.arange(0.0, n - 1 + 1e-6, factor)
    coarse = np.take(blurred, np.round(kept).astype(int), axis=axis)
    position = np.interp(np.arange(n), kept, np.arange(kept.size))
    low = np.minimum(np.floor(position).astype(int), max(kept.size - 2, 0))
    weight = (position - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = n
    a = np.take(coarse, low, axis=axis)
    b = np.take(coarse, np.minimum(low + 1, kept.size - 1), axis=axis)
    return a + (b - a) * weight.reshape(shape)


def acquire(signal: np.ndarray, brain: np.ndarray, grid: Grid, rng: np.random.Generator,
            ranges: SynthesisRanges) -> tuple[np.ndarray, dict]:
    """Noise-free signal [Z, Y, X] (>= 0) -> the raw image, and what was drawn."""
    drawn: dict = {}
    peak = float(signal.max()) or 1.0
    gamma = float(math.exp(rng.normal(0.0, ranges.gamma_log_sd)))
    image = (np.power(signal / peak, gamma) * peak).astype(np.float32)
    strength = float(rng.uniform(*ranges.bias_strength))
    if strength > 0:
        field = spatial_noise(rng, grid.axes_mm(), float(rng.uniform(40.0, 90.0)), 140.0)
        field /= max(float(np.abs(field[brain]).max()), 1e-6) if brain.any() else 1.0
        image *= np.exp(np.float32(strength) * field)
    sigma = float(rng.uniform(*ranges.blur_sigma_vox))
    if sigma > 0.05:
        image = ndimage.gaussian_filter(image, sigma, mode="constant")
    drawn.update(gamma=round(gamma, 3), bias=round(strength, 3), blur_sigma_vox=round(sigma, 3))
    if rng.random() < ranges.thick_slice_probability:
        axis = int(rng.integers(3))
        thickness = float(rng.uniform(*ranges.slice_thickness_mm))
        factor = thickness / grid.spacing_zyx[axis]
        if factor > 1.2:
            image = thick_slices(image, axis, factor, factor / 2.355)
            drawn.update(thick_axis_zyx=axis, thickness_mm=round(thickness, 2))
    snr = _log_uniform(rng, ranges.snr)
    mean = float(image[brain].mean()) if brain.any() else 1.0
    sd = np.float32(mean / snr)
    real = image + sd * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sd * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)
    scale = _log_uniform(rng, ranges.global_scale)
    offset = float(rng.uniform(*ranges.global_offset))
    image = np.where(brain, (image / max(mean, 1e-6) + offset) * scale, 0.0).astype(np.float32)
    drawn.update(snr=round(snr, 2), scale=round(scale, 1), offset=round(offset, 3))
    return image, drawn
