"""The training synthesiser (Training/synthesis): deterministic, varied, BraTS-valid cases; the demo
generator untouched."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLesionSAMLib.conventions import MODALITIES
from Training.synthesis import SHIFTED, TRAINING, synthesise_case
from Training.synthesis.acquisition import thick_slices
from Training.synthesis.contrast import check_relations, draw_contrast

# sha256 over the sorted arrays of the demo generator's sample case, recorded before the
# synthesiser existed: the sample case and the demo must stay bit-identical.
SAMPLE_CASE_SHA256 = {1: "bc54312dffd0e2eb3273890ed6a81c83dfd07427fabde3ac6371df6c366d3915",
                      2: "dea9e7cd33a0babfb3cf0700706458d857d1f853a2298743cf1614c4e6fb51e6"}


@pytest.fixture(scope="module")
def cases():
    return {seed: synthesise_case(seed) for seed in (1, 2, 3)}


def _arrays(case):
    return {m: sitk.GetArrayFromImage(case.images[m]) for m in MODALITIES}, sitk.GetArrayFromImage(case.labels)


@pytest.mark.parametrize("resolution", [2])
def test_sample_case_is_bit_identical(resolution):
    from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, SampleParameters, generate_case

    case = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=resolution))
    digest = hashlib.sha256()
    for key in sorted(case):
        digest.update(key.encode())
        digest.update(sitk.GetArrayViewFromImage(case[key]).tobytes())
    assert digest.hexdigest() == SAMPLE_CASE_SHA256[resolution]


@pytest.mark.slow  # renders whole cases (about 5 s each on one core)
def test_same_seed_same_voxels_other_seed_differs(cases):
    again = synthesise_case(1)
    images, labels = _arrays(cases[1])
    images_again, labels_again = _arrays(again)
    assert all(np.array_equal(images[m], images_again[m]) for m in MODALITIES)
    assert np.array_equal(labels, labels_again)
    assert cases[1].images["t1"].GetSpacing() == again.images["t1"].GetSpacing()
    other, _ = _arrays(cases[2])
    assert other["flair"].shape != images["flair"].shape or not np.array_equal(other["flair"], images["flair"])


@pytest.mark.slow  # renders whole cases (about 5 s each on one core)
def test_images_and_labels_share_one_grid_with_brats_values(cases):
    for case in cases.values():
        images, labels = _arrays(case)
        for m in MODALITIES:
            image = case.images[m]
            assert image.GetSize() == case.labels.GetSize()
            assert image.GetSpacing() == case.labels.GetSpacing()
            assert np.isfinite(images[m]).all() and images[m].min() >= 0
        assert set(np.unique(labels)) <= {0, 1, 2, 4}
        brain = images["t1"] > 0
        assert not (labels[~brain] > 0).any(), "no lesion label outside the brain mask"
        assert 0.9 <= min(case.info["spacing_zyx"]) and max(case.info["spacing_zyx"]) <= 2.0


@pytest.mark.slow  # renders whole cases (about 5 s each on one core)
def test_cases_vary_in_what_the_issue_names(cases):
    """Over 60 seeds' plans (cheap: no voxels): healthy and lesion cases, every lesion type and
    location, volumes over three orders of magnitude, 1-4 lesions, flips, voxel sizes; over the
    rendered cases: raw intensity scales that differ between cases."""
    from Training.synthesis.anatomy import SpatialTransform, draw_grid
    from Training.synthesis.case import _streams
    from Training.synthesis.lesions import LOCATIONS, TYPES, plan_lesions

    plans, flips, spacings = [], set(), []
    for seed in range(300, 360):
        rng = _streams(seed)
        grid = draw_grid(rng["grid"], TRAINING)
        transform = SpatialTransform.draw(rng["anatomy"], TRAINING)
        plans.append(plan_lesions(rng["lesions"], TRAINING, transform, grid))
        flips.add(transform.flip)
        spacings.append(tuple(grid.spacing_zyx))
    volumes = [p.volume_ml for case in plans for p in case]
    assert any(not case for case in plans) and {len(case) for case in plans} >= {0, 1, 2}
    assert {p.kind for case in plans for p in case} == set(TYPES)
    assert {p.location for case in plans for p in case} == set(LOCATIONS)
    assert min(volumes) < 1.0 and max(volumes) > 100.0
    assert flips == {True, False} and len(set(spacings)) > 10 and (1.0, 1.0, 1.0) in spacings
    scales = [case.info["acquisition"]["t1"]["scale"] for case in cases.values()]
    assert len(set(scales)) == len(scales)


def test_contrast_keeps_only_the_brats_defining_relations():
    rng = np.random.default_rng(0)
    draws = [draw_contrast(rng, TRAINING) for _ in range(300)]
    for draw in draws:
        assert check_relations({m: {c: v[0] for c, v in classes.items()} for m, classes in draw.items()}) == []
    # Everything else is random: white matter is brighter than grey on T1 in some cases, darker in others.
    t1_order = [d["t1"]["wm_a"] > d["t1"]["gm_a"] for d in draws]
    flair_order = [d["flair"]["csf_a"] > d["flair"]["wm_a"] for d in draws]
    assert 0.2 < np.mean(t1_order) < 0.8 and 0.2 < np.mean(flair_order) < 0.8


@pytest.mark.slow  # renders whole cases (about 5 s each on one core)
def test_enhancing_tumour_is_brightest_on_t1ce_in_the_image():
    """The relation holds in the voxels too, not only in the drawn means: median T1CE of ET above
    the median of every other labelled or brain voxel."""
    for seed in range(200, 212):
        case = synthesise_case(seed)
        images, labels = _arrays(case)
        if (labels == 4).sum() < 50:
            continue
        t1ce = images["t1ce"]
        brain = t1ce > 0
        assert np.median(t1ce[labels == 4]) > np.median(t1ce[brain & (labels == 0)])
        if (labels == 2).sum() > 50:
            flair = images["flair"]
            assert np.median(flair[labels == 2]) > np.median(flair[brain & (labels == 0)])
        return
    pytest.fail("no case with enhancing tumour among 12 seeds")


def test_thick_slices_keep_constant_images_and_smooth_along_one_axis():
    constant = np.full((20, 8, 8), 3.0, np.float32)
    assert np.allclose(thick_slices(constant, 0, 4.0, 1.7)[3:-3], 3.0, atol=1e-5)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((40, 16, 16)).astype(np.float32)
    thick = thick_slices(noise, 0, 5.0, 2.1)
    along = np.abs(np.diff(thick, axis=0)).mean()
    across = np.abs(np.diff(thick, axis=1)).mean()
    assert along < 0.5 * across


def test_shifted_ranges_lie_outside_the_training_ranges():
    assert SHIFTED["bias"].bias_strength[0] > TRAINING.bias_strength[1]
    assert SHIFTED["low_snr"].snr[1] < TRAINING.snr[0]
    assert SHIFTED["thick_slices"].slice_thickness_mm[0] >= TRAINING.slice_thickness_mm[1]
    assert SHIFTED["rotation"].rotation_deg[1] > TRAINING.rotation_deg[1]


def test_synthesis_config_is_checked():
    from Training.config import TrainingConfigError, load_config

    config = load_config("unet2d_synthesis")
    assert config["data"]["synthesis"]["cases_per_pool"] == 32 and config["data"]["synthesis"]["ranges"] == "training"
    with pytest.raises(TrainingConfigError, match="steps_per_epoch"):
        load_config("unet2d_synthesis", ["train.steps_per_epoch=null"])
    with pytest.raises(TrainingConfigError, match="unknown data.synthesis key"):
        load_config("unet2d_synthesis", ['data.synthesis={"seed": 0, "cases": 3}'])
    with pytest.raises(TrainingConfigError, match="ranges"):
        load_config("unet2d_synthesis", ['data.synthesis={"ranges": "mri"}'])
    with pytest.raises(TrainingConfigError, match="replaces a dataset"):
        load_config("unet2d_synthesis", ['data.root="/data/brats"'])


@pytest.mark.slow  # two short trainings on synthesised pools (about a minute on one core)
def test_synthesis_training_resumes_exactly(tmp_path):
    """Killed after its first pool and resumed, a run ends with the weights of an uninterrupted one:
    the pools are regenerated from their seeds."""
    import os
    import subprocess
    import sys

    from BrainLesionSAMLib.checkpoints import load_checkpoint

    overrides = ["method_config={\"channels\": [4, 8], \"strides\": [2], \"num_res_units\": 0}",
                 'data.synthesis={"seed": 5, "cases_per_pool": 1, "validation_cases": 0, "background": false}',
                 "train.epochs=2", "train.steps_per_epoch=2", "train.batch_size=2", "train.num_workers=0",
                 "train.checkpoint_every_steps=2", "train.threads=1", "init_from=null", "validation.every_epochs=0"]

    def run(name, kill_at=None):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if kill_at:
            env["BRAINLESIONSAM_TRAIN_KILL_AT_STEP"] = str(kill_at)
        return subprocess.run([sys.executable, "-m", "Training.train", "--config", "unet2d_synthesis",
                               f'output.dir="{tmp_path / name}"', f'data.cache="{tmp_path / name / "cache"}"', *overrides],
                              env=env, capture_output=True, text=True)

    assert run("straight").returncode == 0
    assert run("resumed", kill_at=3).returncode != 0
    resumed = run("resumed")
    assert resumed.returncode == 0, resumed.stderr
    straight = load_checkpoint(tmp_path / "straight" / "final.safetensors")[1]["sha256"]
    assert load_checkpoint(tmp_path / "resumed" / "final.safetensors")[1]["sha256"] == straight


def test_no_pool_is_made_for_epochs_the_run_will_not_have(tmp_path):
    """A run's last pool starts no background synthesis of a next one (it would only take CPU from
    the training), and a next pool already being made when the run learns its length is stopped."""
    from Training.synthesis.pools import PoolMaker, pool_folder

    eager = PoolMaker(tmp_path, seed=3, count=1, background=True)
    assert eager.ready(0) == ["synth_p00000_0000"]
    process = eager._pending[1]            # without a known end, pool 1 is started at once
    eager.stop_after(0)
    assert not eager._pending and not process.is_alive()
    bounded = PoolMaker(tmp_path, seed=3, count=1, background=True)
    bounded.stop_after(0)
    assert bounded.ready(0) == ["synth_p00000_0000"] and not bounded._pending
    bounded.close()
    assert not pool_folder(tmp_path, 1).exists() or not any(pool_folder(tmp_path, 1).glob("*/"))
