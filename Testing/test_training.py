"""The training package: dataset layouts and splits, the cache, sampling, configs, the smoke config of
every registered method, a real 2-process gloo run, and kill-and-resume equality.

Generated cases at 2 mm (120 x 120 x 78) keep it to a few seconds per training run on a CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.checkpoints import load_checkpoint, load_method, save_checkpoint, tensors_sha256
from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.methods import MethodFacts, SegmentationMethod, get_method_class, method_names
from BrainLesionSAMLib.preprocessing import SliceGeometry, prepare_case
from BrainLesionSAMLib.pth import file_sha256
from Training import train as train_cli
from Training.cache import CachedCase, entry_is_current, prepare_cache, write_entry
from Training.config import (TrainingConfigError, available_configs, load_config, method_class, smoke_configs)
from Training.datasets import (DatasetError, check_splits, find_cases, make_splits, read_splits, select_fold,
                               write_splits)
from Training.sampling import BalancedDistributedSampler, TrainingSamples, box_from_mask, crop_patch
from Training.export import export_run
from Training.trainer import KILL_AT_STEP_ENV, Trainer

ROOT = Path(__file__).resolve().parents[1]
N_CASES = 4
# Methods that have no training config on purpose, with the reason.
NOT_TRAINED = {"medsam": "zero-shot MedSAM baseline with the user's medsam_vit_b.pth; its trainable "
                         "counterpart is DB-SAM (dbsam config)"}


def shared_cases(tmp_path_factory) -> tuple[Path, Path]:
    """Generated 2 mm cases and their cache, made once per test session (shared with test_evaluate)."""
    base = tmp_path_factory.getbasetemp() / "training_cases"
    root, cache = base / "cases", base / "cache"
    if not (cache / ".done").exists():
        from BrainLesionSAMLib.sample import generate_cases

        generate_cases(root, N_CASES, seed=0, resolution=2, overwrite=True)
        prepare_cache(find_cases(root), cache, log=lambda message: None)
        (cache / ".done").touch()
    return root, cache


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return shared_cases(tmp_path_factory)


def tiny_unet_overrides(root: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"data.cache={cache}", f"output.dir={out}", *extra]


# ----------------------------------------------------------------------------------------------
# Dataset layouts and splits
# ----------------------------------------------------------------------------------------------

def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_find_cases_knows_the_dataset_layouts(tmp_path):
    for case in ("BraTS20_Training_001", "BraTS20_Training_002"):
        for key in ("t1", "t1ce", "t2", "flair", "seg"):
            _touch(tmp_path / "b20" / case / f"{case}_{key}.nii.gz")
    _touch(tmp_path / "b20" / "name_mapping.csv")
    for key in ("t1", "t1ce", "t2", "flair", "seg"):
        _touch(tmp_path / "b21" / "BraTS2021_00000" / f"BraTS2021_00000_{key}.nii.gz")
    for case in ("BraTS-GLI-00012-000", "BraTS-GLI-00012-001", "BraTS-GLI-00013-000"):
        for key in ("t1n", "t1c", "t2w", "t2f", "seg"):
            _touch(tmp_path / "b23" / case / f"{case}-{key}.nii.gz")
    for subject in ("sub-00001", "sub-00002"):
        anat = tmp_path / "fcd" / subject / "anat"
        _touch(anat / f"{subject}_acq-iso08_T1w.nii.gz")
        _touch(anat / f"{subject}_acq-T2sel_FLAIR.nii.gz")
    _touch(tmp_path / "fcd" / "sub-00001" / "anat" / "sub-00001_acq-T2sel_FLAIR_roi.nii.gz")
    _touch(tmp_path / "fcd" / "derivatives" / "readme.txt")
    (tmp_path / "fcd" / "participants.tsv").write_text("participant_id\n")

    b20 = find_cases(tmp_path / "b20")
    assert [c.case_id for c in b20] == ["BraTS20_Training_001", "BraTS20_Training_002"]
    assert all(c.layout == "brats2020" and c.modalities == MODALITIES and c.label is not None for c in b20)
    assert b20[0].images["t1ce"].name == "BraTS20_Training_001_t1ce.nii.gz"
    assert find_cases(tmp_path / "b21")[0].layout == "brats2021"
    b23 = find_cases(tmp_path / "b23")
    assert {c.layout for c in b23} == {"brats2023"} and all(c.modalities == MODALITIES for c in b23)
    assert b23[0].images["flair"].name.endswith("-t2f.nii.gz") and b23[0].label.name.endswith("-seg.nii.gz")
    assert [c.patient_id for c in b23] == ["BraTS-GLI-00012", "BraTS-GLI-00012", "BraTS-GLI-00013"]
    fcd = find_cases(tmp_path / "fcd")
    assert [(c.case_id, c.layout, c.modalities) for c in fcd] == [
        ("sub-00001", "fcd2023", ("t1", "flair")), ("sub-00002", "fcd2023", ("t1", "flair"))]
    assert fcd[0].label.name == "sub-00001_acq-T2sel_FLAIR_roi.nii.gz" and fcd[1].label is None
    with pytest.raises(DatasetError, match="no case folders"):
        find_cases(tmp_path / "fcd" / "derivatives")
    with pytest.raises(DatasetError, match="does not exist"):
        find_cases(tmp_path / "missing")


def _fake_cases(patients: int, visits: int = 1):
    from Training.datasets import CaseSource

    return [CaseSource(f"BraTS-GLI-{p:05d}-{v:03d}", f"BraTS-GLI-{p:05d}", "brats2023", {}, None)
            for p in range(patients) for v in range(visits)]


def test_splits_keep_every_patient_in_one_set_and_are_seeded(tmp_path):
    cases = _fake_cases(20, visits=2)
    splits = make_splits(cases, seed=3, fractions=[0.6, 0.2, 0.2])
    assert make_splits(cases, seed=3, fractions=[0.6, 0.2, 0.2]) == splits
    assert make_splits(cases, seed=4, fractions=[0.6, 0.2, 0.2])["test"] != splits["test"]
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == (24, 8, 8)
    assert sorted(splits["train"] + splits["validation"] + splits["test"]) == sorted(c.case_id for c in cases)
    for name in ("train", "validation", "test"):
        patients = {c.rsplit("-", 1)[0] for c in splits[name]}
        assert all(f"{p}-000" in splits[name] and f"{p}-001" in splits[name] for p in patients)

    folded = make_splits(cases, seed=3, fractions=[0.6, 0.2, 0.2], folds=4)
    pool = sorted(folded["folds"][0]["train"] + folded["folds"][0]["validation"])
    assert sorted(c for fold in folded["folds"] for c in fold["validation"]) == pool
    for index, fold in enumerate(folded["folds"]):
        assert not set(fold["train"]) & set(fold["validation"]) and not set(pool) & set(folded["test"])
        assert select_fold(folded, index)["validation"] == fold["validation"]

    path = write_splits(folded, tmp_path / "splits.json")
    assert read_splits(path, known_cases=[c.case_id for c in cases]) == json.loads(path.read_text())
    with pytest.raises(DatasetError, match="not in the dataset"):
        read_splits(path, known_cases=[c.case_id for c in cases[:10]])
    broken = {**splits, "test": splits["test"] + [splits["train"][0][:-3] + "001"]}
    with pytest.raises(DatasetError, match="in both"):
        check_splits(broken)


# ----------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------

def test_cache_holds_the_library_preprocessing(cases, tmp_path):
    root, cache = cases
    source = find_cases(root)[0]
    entry = CachedCase.open(cache, source.case_id)
    prepared = prepare_case(source.images)
    assert entry.images.dtype == np.uint8 and entry.images.shape == prepared.images.shape
    difference = np.abs(entry.images.astype(np.float32) - prepared.images)
    assert difference[entry.images > 1].max() <= 0.5 + 1e-4 and difference.max() < 1.0  # rounded; (0, 0.5) -> 1
    assert np.array_equal(entry.images > 0, prepared.images > 0)  # the brain mask survives the rounding
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(source.label)))
    assert np.array_equal(entry.labels, labels) and set(np.unique(labels)) <= {0, 1, 2, 4}
    assert entry.spacing_zyx == prepared.spacing_zyx == (2.0, 2.0, 2.0)
    assert entry.meta["lesion_slices"] == np.flatnonzero(labels.any(axis=(1, 2))).tolist()
    assert entry.meta["label_set"] == "brats"
    again = entry.prepared_case()
    assert again.reference.GetOrigin() == prepared.reference.GetOrigin()
    assert again.reference.GetDirection() == prepared.reference.GetDirection()
    assert np.array_equal(again.brain_mask, prepared.brain_mask)
    assert entry_is_current(source, cache)

    # BraTS 2023 numbering (ET = 3) is stored as BraTS 2021 (ET = 4); a changed file is stale.
    from Training.datasets import CaseSource

    copy = tmp_path / "BraTS-GLI-00001-000"
    copy.mkdir()
    seg = labels.copy()
    seg[seg == 4] = 3
    image = sitk.GetImageFromArray(seg)
    image.CopyInformation(sitk.ReadImage(str(source.label)))
    sitk.WriteImage(image, str(copy / "BraTS-GLI-00001-000-seg.nii.gz"))
    moved = CaseSource(copy.name, "BraTS-GLI-00001", "brats2023", source.images, copy / "BraTS-GLI-00001-000-seg.nii.gz")
    write_entry(moved, tmp_path / "cache")
    assert np.array_equal(CachedCase.open(tmp_path / "cache", copy.name).labels, labels)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # nothing half-written
    os.utime(moved.label, ns=(0, 0))
    assert not entry_is_current(moved, tmp_path / "cache")


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def _data_config(cache: Path, **changes):
    config = load_config("unet2d_smoke")
    config["data"].update(cache=str(cache), **changes)
    return config["data"], {**config["augmentation"], "enabled": False}


def test_sampler_balances_slices_and_shards_them_by_rank(cases):
    _, cache = cases
    data, augmentation = _data_config(cache)
    case_ids = [p.name for p in sorted(cache.iterdir()) if p.is_dir()][:2]
    dataset = TrainingSamples(cache, case_ids, get_method_class("unet2d").facts, data, augmentation)
    ranks = [BalancedDistributedSampler(dataset, 2, rank, seed=5, background_ratio=1.0) for rank in range(2)]
    items, seeds = ranks[0].epoch_items(0)
    lesion = dataset.is_lesion[items]
    # Every lesion slice, and as many lesion-free ones as there are (at most as many as lesion slices).
    assert lesion.sum() == dataset.is_lesion.sum()
    assert (~lesion).sum() == min(dataset.is_lesion.sum(), (~dataset.is_lesion).sum()) > 0
    half = BalancedDistributedSampler(dataset, 1, 0, seed=5, background_ratio=0.25).epoch_items(0)[0]
    assert (~dataset.is_lesion[half]).sum() == round(0.25 * dataset.is_lesion.sum())
    assert len(set(items.tolist())) == len(items)
    assert np.array_equal(ranks[1].epoch_items(0)[0], items) and not np.array_equal(ranks[0].epoch_items(1)[0], items)
    shares = [list(sampler) for sampler in ranks]
    assert len(shares[0]) == len(shares[1]) == ranks[0].epoch_length() == -(-len(items) // 2)
    assert sorted(shares[0] + shares[1])[: len(items)] == sorted(zip(items.tolist(), seeds.tolist()))[: len(items)]
    assert not {i for i, _ in shares[0]} & {i for i, _ in shares[1]} or len(items) % 2
    ranks[0].set_start(3)
    assert list(ranks[0]) == shares[0][3:] and len(ranks[0]) == len(shares[0]) - 3


def test_samples_follow_the_training_contract(cases, monkeypatch):
    _, cache = cases
    case_ids = [p.name for p in sorted(cache.iterdir()) if p.is_dir()][:2]
    data, augmentation = _data_config(cache)
    augmentation.update(enabled=True, flip_axes=[1])
    dataset = TrainingSamples(cache, case_ids, get_method_class("unet2d").facts, data, augmentation)
    lesion_item = int(np.flatnonzero(dataset.is_lesion)[0])
    sample = dataset[(lesion_item, 123)]
    assert sample["images"].shape == (4, 256, 256) and sample["images"].dtype == torch.float32
    assert 0 <= sample["images"].min() and sample["images"].max() <= 255
    assert sample["available"].dtype == torch.bool and sample["available"].all()
    assert sample["target"].shape == (256, 256) and sample["target"].dtype == torch.long
    assert set(sample["target"].unique().tolist()) <= {0, 1, 2, 3} and sample["target"].any()
    assert "boxes" not in sample and "modality" not in sample
    again = dataset[(lesion_item, 123)]
    assert all(torch.equal(sample[k], again[k]) for k in sample)  # a sample depends on its seed only
    assert not torch.equal(dataset[(lesion_item, 124)]["images"], sample["images"])
    # Only a bounded number of cases keep their memory maps (file descriptors) open.
    monkeypatch.setattr("Training.sampling.OPEN_CASES", 1)
    other_item = int(np.flatnonzero(dataset.items[:, 0] != dataset.items[lesion_item, 0])[0])
    dataset[(other_item, 1)]
    first, second = (dataset.cases[int(dataset.items[i, 0])] for i in (lesion_item, other_item))
    assert "images" not in first.__dict__ and "images" in second.__dict__
    assert torch.equal(dataset[(lesion_item, 123)]["images"], sample["images"])  # reopened on demand

    # A promptable lesion method gets ground-truth boxes; single-modality sampling names the modality.
    data, augmentation = _data_config(cache, single_modality=True, box_jitter_px=[0, 0])
    dataset = TrainingSamples(cache, case_ids, get_method_class("litemedsam").facts, data, augmentation)
    sample = dataset[(lesion_item, 7)]
    assert set(sample["target"].unique().tolist()) == {0, 1}
    ys, xs = torch.nonzero(sample["target"], as_tuple=True)
    assert sample["boxes"].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert sample["available"].sum() == 1 and sample["available"][sample["modality"]]
    assert all(sample["images"][i].abs().sum() == 0 for i in range(4) if i != sample["modality"])


def test_3d_patches_at_a_working_voxel_size_cover_its_field_of_view(cases):
    """A 3D method with ``working_spacing_mm`` trains on what the engine will show it: a patch of 8^3
    working voxels at 4 mm over the 2 mm cases is a 16^3 crop of the case, block-mean resized (the
    crop is found among the lesion-centred ones and compared with numpy's reshape-mean), its labels
    the crop's nearest voxels."""
    import dataclasses

    _, cache = cases
    case_ids = [p.name for p in sorted(cache.iterdir()) if p.is_dir()][:1]
    data, augmentation = _data_config(cache, foreground_probability=1.0)
    facts = dataclasses.replace(get_method_class("mome").facts, input_size=(8, 8, 8), working_spacing_mm=4.0)
    dataset = TrainingSamples(cache, case_ids, facts, data, augmentation)
    case = dataset.cases[0]
    assert case.spacing_zyx == (2.0, 2.0, 2.0)
    sample = dataset[(0, 11)]
    assert sample["images"].shape == (4, 8, 8, 8) and sample["target"].shape == (8, 8, 8) and sample["target"].any()
    images, labels = np.asarray(case.images, dtype=np.float32), np.asarray(case.labels)
    matches = []
    for centre in case.foreground:
        crop = crop_patch(images, centre, (16, 16, 16))
        if np.allclose(crop.reshape(4, 8, 2, 8, 2, 8, 2).mean(axis=(2, 4, 6)), sample["images"].numpy(), atol=1e-3):
            matches.append(crop_patch(labels, centre, (16, 16, 16))[1::2, 1::2, 1::2])
    assert matches and any(np.array_equal(m > 0, sample["target"].numpy() > 0) for m in matches)


def test_boxes_and_patches():
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 30), bool)
    mask[5:9, 10:14] = True
    for _ in range(20):
        x0, y0, x1, y1 = box_from_mask(mask, rng, (0, 3))
        assert 7 <= x0 <= 10 and 2 <= y0 <= 5 and 14 <= x1 <= 17 and 9 <= y1 <= 12
    assert box_from_mask(np.zeros((20, 30)), rng, (0, 3)) == [0.0, 0.0, 30.0, 20.0]
    volume = np.arange(4 * 5 * 6, dtype=np.int32).reshape(1, 4, 5, 6) + 1
    patch = crop_patch(volume, np.array([0, 0, 0]), (2, 2, 2))
    assert patch.shape == (1, 2, 2, 2) and patch[0, 0].sum() == 0 and patch[0, 1, 1, 1] == volume[0, 0, 0, 0]
    assert np.array_equal(crop_patch(volume, np.array([2, 2, 3]), (4, 5, 6)), volume)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------

PAPERS = ("brainsegdmif", "sofa", "cmaa", "dbsam", "mome")


def test_configs_load_and_carry_the_papers_settings():
    names = set(available_configs())
    assert {*PAPERS, *(f"{p}_smoke" for p in PAPERS)} <= names
    for name in sorted(names):
        config = load_config(name)
        assert config["name"] == name and config["method"]
    dmif = load_config("brainsegdmif")
    assert (dmif["optimizer"]["name"], dmif["optimizer"]["lr"], dmif["scheduler"]["name"],
            dmif["scheduler"]["milestones_epochs"], dmif["scheduler"]["gamma"], dmif["train"]["epochs"]) == \
        ("adam", 1e-4, "multistep", [7, 12], 0.5, 200)
    sofa = load_config("sofa")
    assert (sofa["optimizer"]["name"], sofa["optimizer"]["lr"], sofa["scheduler"]["name"], sofa["train"]["batch_size"]) == \
        ("adam", 3e-5, "cosine", 2)
    cmaa = load_config("cmaa")
    assert (cmaa["optimizer"]["name"], cmaa["optimizer"]["lr"], cmaa["train"]["batch_size"]) == ("adamw", 1e-3, 24)
    dbsam = load_config("dbsam")
    assert (dbsam["optimizer"]["name"], dbsam["optimizer"]["lr"], dbsam["scheduler"]["name"], dbsam["train"]["epochs"],
            dbsam["data"]["box_jitter_px"]) == ("adamw", 1e-4, "poly", 12, [0, 20])
    mome = load_config("mome")
    assert (mome["optimizer"]["name"], mome["optimizer"]["lr"], mome["optimizer"]["momentum"], mome["optimizer"]["nesterov"],
            mome["scheduler"]["name"], mome["train"]["grad_clip_norm"], mome["data"]["single_modality"]) == \
        ("sgd", 1e-3, 0.99, True, "poly", 12, True)
    # A smoke variant shrinks the run but keeps its paper's optimiser.
    assert load_config("sofa_smoke")["optimizer"] == sofa["optimizer"]


# A method's default_config may repeat the paper's training settings; the config must agree with it.
SHARED_SETTINGS = {"optimizer": ("optimizer", "name"), "learning_rate": ("optimizer", "lr"),
                   "weight_decay": ("optimizer", "weight_decay"), "momentum": ("optimizer", "momentum"),
                   "nesterov": ("optimizer", "nesterov"), "batch_size": ("train", "batch_size"),
                   "epochs": ("train", "epochs"), "iterations_per_epoch": ("train", "steps_per_epoch"),
                   "lr_milestones": ("scheduler", "milestones_epochs"), "lr_gamma": ("scheduler", "gamma"),
                   "poly_power": ("scheduler", "power"), "poly_exponent": ("scheduler", "power"),
                   "warmup_epochs": ("scheduler", "warmup_epochs"), "gate_grad_clip": ("train", "grad_clip_norm")}


@pytest.mark.parametrize("paper", [p for p in PAPERS if p in method_names()])
def test_paper_configs_agree_with_the_methods_own_defaults(paper):
    config = load_config(paper)
    defaults = get_method_class(config["method"]).default_config
    for key, (section, entry) in SHARED_SETTINGS.items():
        if key in defaults:
            expected = list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]
            assert config[section][entry] == expected, f"{paper}: {section}.{entry} vs the method's {key}"


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(TrainingConfigError, match="did you mean train.batch_size"):
        load_config("unet2d_smoke", ["train.batchsize=3"])
    with pytest.raises(TrainingConfigError, match="did you mean cmaa"):
        load_config("cmaaa")
    with pytest.raises(TrainingConfigError, match="train.batch_size must be an integer"):
        load_config("unet2d_smoke", ["train.batch_size=0"])
    with pytest.raises(TrainingConfigError, match="optimizer.name"):
        load_config("unet2d_smoke", ["optimizer.name=lbfgs"])
    assert load_config("unet2d_smoke", ["optimizer.lr=0.5", "data.root=/x y"])["data"]["root"] == "/x y"
    unregistered = tmp_path / "future.json"
    unregistered.write_text(json.dumps({"extends": str(ROOT / "Training/configs/unet2d_smoke.json"),
                                        "method": "not_a_method"}))
    config = load_config(unregistered)
    with pytest.raises(TrainingConfigError, match="method 'not_a_method', which is not registered"):
        method_class(config)
    assert train_cli.main(["--config", str(unregistered), f"output.dir={tmp_path / 'run'}"]) == 1
    assert not (tmp_path / "run").exists()


def test_every_registered_method_has_a_smoke_config_or_a_reason():
    smoke = smoke_configs()
    missing = [m for m in method_names() if m not in smoke and m not in NOT_TRAINED]
    assert not missing, f"add Training/configs/<method>_smoke.json (and a paper config) for {missing}"


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------

def _final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state, _ = load_checkpoint(run_dir / "final.safetensors")
    return state


@pytest.mark.parametrize("method", sorted(m for m in smoke_configs() if m in method_names()))
def test_smoke_config_trains(method, cases, tmp_path):
    root, cache = cases
    name = smoke_configs()[method]
    out = tmp_path / name
    config = load_config(name, tiny_unet_overrides(root, cache, out))
    summary = Trainer(config, log=lambda message: None).run()
    steps = config["train"]["max_steps"]
    assert summary["steps"] == steps and summary["rank_weight_sha256"][0] != summary["initial_weight_sha256"]
    losses = [float(line.split(",")[3]) for line in (out / "metrics.csv").read_text().splitlines()[1:]
              if ",train/loss," in line]
    assert len(losses) == steps and np.all(np.isfinite(losses))
    model = load_method(method, out / "final.safetensors")  # the release format loads with the library
    assert tensors_sha256(model.state_dict()) == summary["rank_weight_sha256"][0]


@pytest.mark.parametrize("method", sorted(m for m in smoke_configs() if m in method_names()))
def test_init_auto_builds_every_method_with_its_config(method, tmp_path):
    """"init": "auto" hands the method config to pretrained(); a method without third-party weights
    for the whole network answers None and is built from the same config."""
    config = load_config(smoke_configs()[method], ['init="auto"', f'output.dir="{tmp_path / "run"}"'])
    model = Trainer(config, log=lambda message: None)._build_method(get_method_class(method))
    assert model.facts.name == method
    assert all(json.loads(json.dumps(model.config[key])) == value for key, value in config["method_config"].items())


def _run(args: list[str], env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def test_two_gloo_processes_end_with_identical_weights(cases, tmp_path):
    root, cache = cases
    out = tmp_path / "ddp"
    result = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "Training.train",
                   "--config", "unet2d_smoke", *tiny_unet_overrides(root, cache, out),
                   "train.max_steps=3", "validation.every_epochs=0", "train.backend=gloo"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    rank0, rank1 = summary["rank_weight_sha256"]
    assert rank0 == rank1 == tensors_sha256(_final_state(out)) != summary["initial_weight_sha256"]


def test_kill_and_resume_gives_the_weights_of_an_uninterrupted_run(cases, tmp_path):
    root, cache = cases
    # Dropout and a data-loader worker: the random states and the per-sample seeds must both resume.
    common = ["-m", "Training.train", "--config", "unet2d_smoke", "train.max_steps=6", "train.checkpoint_every_steps=2",
              "train.threads=1",
              "method_config.dropout=0.2", "train.num_workers=1", "validation.every_epochs=0", "scheduler.warmup_epochs=0"]
    uninterrupted = _run(common + tiny_unet_overrides(root, cache, tmp_path / "full"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    killed = _run(common + tiny_unet_overrides(root, cache, tmp_path / "killed"), env={KILL_AT_STEP_ENV: "5"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in sorted((tmp_path / "killed" / "checkpoints").iterdir())] == \
        ["step_00000002.pt", "step_00000004.pt"] and not (tmp_path / "killed" / "final.safetensors").exists()
    resumed = _run(common + tiny_unet_overrides(root, cache, tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step 4" in resumed.stdout
    full, again = _final_state(tmp_path / "full"), _final_state(tmp_path / "killed")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
    rows = [line.split(",")[:3] for line in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(step) for step, _, name in rows if name == "train/loss"] == [1, 2, 3, 4, 5, 6]
    # A different config must not continue this run.
    other = load_config("unet2d_smoke", tiny_unet_overrides(root, cache, tmp_path / "killed", "optimizer.lr=0.1"))
    with pytest.raises(Exception, match="different config"):
        Trainer(other, log=lambda message: None).run()


class TinyPatchNet(SegmentationMethod):
    """A 3D method for the patch path while no 3D paper method is registered (MoME is being written)."""

    facts = MethodFacts(name="tiny3d_test", title="test", modalities=MODALITIES, required_modalities=(),
                        spatial_dims=3, label_set="lesion", promptable=False, cacheable_embeddings=False,
                        input_size=(16, 32, 32))
    default_config = {"width": 4}

    def __init__(self, **config):
        super().__init__(**config)
        width = self.config["width"]
        self.net = torch.nn.Sequential(torch.nn.Conv3d(4, width, 3, padding=1), torch.nn.ReLU(),
                                       torch.nn.Conv3d(width, 2, 1))

    def forward(self, images, available, boxes=None):
        return self.net(images / 255.0)

    def training_loss(self, batch, progress=0.0):
        assert batch["images"].shape[1:] == (4, 16, 32, 32) and batch["modality"].shape == (len(batch["images"]),)
        return super().training_loss(batch, progress)


def test_3d_patch_training_with_validation(cases, tmp_path, monkeypatch):
    from BrainLesionSAMLib.methods import base

    monkeypatch.setitem(base._REGISTRY, "tiny3d_test", TinyPatchNet)
    root, cache = cases
    config = load_config("mome_smoke", tiny_unet_overrides(root, cache, tmp_path / "run") + [
        "method=tiny3d_test", "method_config={}", "train.grad_clip_parameters=null", "train.steps_per_epoch=2", "train.max_steps=2", "train.batch_size=2",
        "validation.every_epochs=1", "validation.max_cases=1", "validation.batch_size=64"])
    summary = Trainer(config, log=lambda message: None).run()
    assert summary["steps"] == 2 and summary["best"]["score"] is not None
    assert 0.0 <= summary["best"]["metrics"]["val/lesion_dice"] <= 1.0


def test_prepare_only_and_export(cases, tmp_path, capsys):
    root, cache = cases
    out = tmp_path / "run"
    overrides = tiny_unet_overrides(root, cache, out, "train.max_steps=2", "data.split_seed=9")
    assert train_cli.main(["--config", "unet2d_smoke", "--prepare-only", *overrides]) == 0
    splits = cache / "splits_seed9_0.7-0.1-0.2.json"
    assert splits.exists() and "2 train, 1 validation, 1 test" in capsys.readouterr().out
    Trainer(load_config("unet2d_smoke", overrides), log=lambda message: None).run()

    target = tmp_path / "unet2d_sample_run.safetensors"
    assert train_cli.main(["--export", str(out), "--out", str(target), "--url", "https://example.org/w.safetensors",
                           "--licence", "CC-BY-4.0"]) == 0
    entry = json.loads(Path(f"{target}.catalogue.json").read_text())
    assert entry["sha256"] == file_sha256(target) and entry["size"] == target.stat().st_size
    assert (entry["id"], entry["method"], entry["file_name"], entry["url"], entry["licence"]) == \
        ("unet2d_smoke-best", "unet2d", target.name, "https://example.org/w.safetensors", "CC-BY-4.0")
    assert entry["config"] == {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 0}
    assert entry["labels"] == [0, 1, 2, 4] and entry["modalities"] == list(MODALITIES)
    # The catalogue (what the Slicer module and the CLI read) accepts the entry and loads the file with it.
    from BrainLesionSAMLib.catalogue import ModelEntry, load_weights_file

    catalogued = ModelEntry.from_dict(entry, "test")
    assert tensors_sha256(load_weights_file(catalogued.method, target, catalogued.config).state_dict()) == \
        load_checkpoint(target)[1]["sha256"]
    model = load_method("unet2d", target)
    best, _ = load_checkpoint(out / "best.safetensors")
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())
    assert train_cli.main(["--export", str(out), "--out", str(target)]) == 1  # never overwrites
    last = tmp_path / "last.safetensors"
    assert train_cli.main(["--export", str(out), "--out", str(last), "--which", "last"]) == 0
    assert tensors_sha256(load_method("unet2d", last).state_dict()) == tensors_sha256(_final_state(out))
    # A release file describes its data in words of its own, not by the training machine's folder.
    described = tmp_path / "described.safetensors"
    entry = export_run(out, described, which="final", training_data="16 generated cases at 1 mm")
    assert load_checkpoint(described)[1]["training_data"] == "16 generated cases at 1 mm"
    assert entry["description"].startswith("16 generated cases at 1 mm") and str(root) not in entry["description"]


def test_mome_experts_config_is_the_methods_pretraining_recipe():
    """MoME's stage 1 (mome_experts) trains with the method's own pre-training settings and differs
    from stage 2 (mome) only in the stage, the optimiser's rate, the epochs and what is clipped, so
    that stage 2's --init-from finds the same architecture."""
    from BrainLesionSAMLib.methods.mome import MoME

    stage1, stage2 = load_config("mome_experts"), load_config("mome")
    assert stage1["method_config"] == {"training_stage": "experts"} and "training_stage" not in stage2["method_config"]
    assert stage1["optimizer"]["lr"] == MoME.default_config["pretraining_learning_rate"]
    assert stage1["train"]["epochs"] == MoME.default_config["pretraining_epochs"]
    assert stage1["train"]["grad_clip_parameters"] is None and stage1["init_from"] is None
    differ = {(section, key) for section in ("optimizer", "scheduler", "train", "data", "augmentation")
              for key in stage1[section] if stage1[section][key] != stage2[section][key]}
    assert differ == {("optimizer", "lr"), ("train", "epochs"), ("train", "grad_clip_parameters")}
    with pytest.raises(TrainingConfigError, match="init_from must be"):
        load_config("mome_smoke", ["init_from=3"])


def test_a_2p5d_unet_samples_neighbouring_slices_and_starts_from_2d_weights(cases, tmp_path):
    """unet2d with context_slices 1: each training sample holds slices z-1, z, z+1 (the 2D samples of
    those slices, same modality dropout); init_from a 2D checkpoint gives a network that computes what
    the 2D one did, whatever the neighbours hold; training runs and the result loads with the library."""
    root, cache = cases
    case_ids = [p.name for p in sorted(cache.iterdir()) if p.is_dir()][:1]
    data, augmentation = _data_config(cache, modality_dropout=1.0)
    small = {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}
    wide_facts = get_method_class("unet2d")(**small, context_slices=1).facts
    flat = TrainingSamples(cache, case_ids, get_method_class("unet2d").facts, data, augmentation)
    wide = TrainingSamples(cache, case_ids, wide_facts, data, augmentation)
    item = int(np.flatnonzero(wide.is_lesion)[0])
    z = int(wide.items[item, 1])
    seed = next(s for s in range(100) if not wide[(item, s)]["available"].all())  # one with a modality dropped
    sample = wide[(item, seed)]
    assert sample["images"].shape == (12, 256, 256)
    assert torch.equal(sample["images"][4:8], flat[(item, seed)]["images"])
    assert torch.equal(sample["available"], flat[(item, seed)]["available"])
    assert not sample["images"][~sample["available"].repeat(3)].any()  # dropped: zero in every slice
    below = np.asarray(CachedCase.open(cache, case_ids[0]).images[:, z - 1], np.float32)
    expected_below = SliceGeometry(*below.shape[-2:]).to_network(below[None])[0]
    assert torch.equal(sample["images"][:4], expected_below * sample["available"].float()[:, None, None])

    torch.manual_seed(0)
    flat_model = get_method_class("unet2d")(**small).eval()
    checkpoint = tmp_path / "flat.safetensors"
    save_checkpoint(flat_model, checkpoint)
    out = tmp_path / "wide_run"
    config = load_config("unet2d_smoke", tiny_unet_overrides(
        root, cache, out, "method_config.num_res_units=1", "method_config.context_slices=1",
        f"init_from={json.dumps(str(checkpoint))}"))
    trainer = Trainer(config, log=lambda message: None)
    wide_model = trainer._build_method(get_method_class("unet2d")).eval()
    images = torch.rand(2, 12, 64, 64) * 255
    available = torch.tensor([[True, True, False, True], [True, False, True, True]])
    with torch.no_grad():
        torch.testing.assert_close(wide_model(images, available), flat_model(images[:, 4:8], available))
    # 'spread': each slice a third of the 2D kernels - the same function where the neighbours equal the slice
    spread = get_method_class("unet2d")(**small, context_slices=1, context_init="spread").eval()
    spread.load_state_dict(spread.adapt_initial_state(flat_model.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(spread(images[:, 4:8].repeat(1, 3, 1, 1), available),
                                   flat_model(images[:, 4:8], available), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(spread(images, available), flat_model(images[:, 4:8], available), atol=1e-3)
    summary = Trainer(config, log=lambda message: None).run()
    trained = load_method("unet2d", out / "final.safetensors")
    assert trained.facts.context_slices == 1 and tensors_sha256(trained.state_dict()) == summary["rank_weight_sha256"][0]
