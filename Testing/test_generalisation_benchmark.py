"""The generalisation benchmark's scoring of other methods (issue 21): a one-lesion-class model is
scored on the whole tumour only, and the phantom-study page summarises its results file."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _truth():
    truth = np.zeros((8, 16, 16), np.uint8)
    truth[2:6, 4:12, 4:12] = 2          # oedema
    truth[3:5, 6:10, 6:10] = 4          # enhancing core
    return truth


def test_lesion_model_is_scored_on_the_whole_tumour_only():
    bench = _module("generalisation")
    truth = _truth()
    lesion = (truth > 0).astype(np.uint8)
    lesion[2, 4:12, 4:12] = 0           # one of the four lesion slices missed: Dice 2 * 192 / (192 + 256)
    row = bench.score(lesion, truth, (1.0, 1.0, 1.0), label_set="lesion")
    assert "TC_dice" not in row and "ET_dice" not in row
    assert abs(row["WT_dice"] - 2 * 192 / (192 + 256)) < 1e-6
    assert row["lesions"] == 1 and row["detected"] == 1 and row["false_positive_lesions"] == 0
    # the same voxels as a BraTS map (all oedema) score WT alike, and TC / ET as misses
    brats = bench.score(lesion * 2, truth, (1.0, 1.0, 1.0))
    assert abs(brats["WT_dice"] - row["WT_dice"]) < 1e-6 and brats["ET_dice"] == 0.0


def test_release_comparison_section_summarises_the_results_file(tmp_path):
    study = _module("phantom_study")
    rows = lambda *dice: {"rows": [{"WT_dice": d} for d in dice] + [{"true_ml": 0.0}]}  # noqa: E731
    results = {"cases_per_group": 3, "groups": {
        "synth_training": {"cmaa cc>=0.1ml": rows(0.9, 0.7), "cmaa FLAIR cc>=0.1ml": rows(0.5, 0.3),
                           "cmaa cc>=0ml": rows(0.0, 0.0)},
        "sample_2mm": {"cmaa cc>=0.1ml": rows(0.8), "cmaa FLAIR cc>=0.1ml": rows(0.4),
                       "cmaa cc>=0ml": rows(0.0)}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    study.REPO = tmp_path
    lines = study.release_comparison_lines(path)
    assert "| model | n | WT Dice (all groups) | synth_training | sample_2mm |" in lines
    assert "| cmaa | 3 | 80.0 ± 8.2 | 80.0 | 80.0 |" in lines
    assert "| cmaa FLAIR | 3 | 40.0 ± 8.2 | 40.0 | 40.0 |" in lines
    assert study.release_comparison_lines(tmp_path / "missing.json") == []


def test_box_methods_get_the_lesion_box_and_skip_healthy_cases(tmp_path, monkeypatch):
    """A box-requiring method (DB-SAM) is given the drawn-ROI box - the bounding box of every lesion
    voxel - and is left out on a healthy case; an automatic one gets no box and runs on every case."""
    import types

    import SimpleITK as sitk

    from BrainLesionSAMLib.engine import Box

    bench = _module("generalisation")
    truth = _truth()
    cases = {0: truth, 1: np.zeros_like(truth)}          # a lesion case and a healthy one
    monkeypatch.setattr(bench, "groups", lambda: {"synth_training": None})

    def make_case(group, index, spec):
        labels = sitk.GetImageFromArray(cases[index])
        labels.SetSpacing((5.0, 5.0, 5.0))  # 0.125 ml voxels: a 4-voxel speck is 0.5 ml
        return {m: labels for m in bench.MODALITIES}, labels, {"kind": "necrotic_rim" if index == 0 else "healthy"}

    calls = []

    def segment_images(images, method, box=None, **options):
        calls.append((method.facts.name, box))
        lesion = truth > 0
        lesion[0, 0:2, 0:2] = True       # plus a 4-voxel speck the network is unsure of
        confidence = np.where(truth > 0, 0.95, 0.55)
        probabilities = sitk.GetImageFromArray(np.stack([1 - confidence, confidence], -1).astype(np.float32),
                                               isVector=True)
        labels = sitk.GetImageFromArray(lesion.astype(np.uint8))
        return types.SimpleNamespace(result=types.SimpleNamespace(labels=labels, probabilities=probabilities))

    def fake(name, requires_box):
        facts = types.SimpleNamespace(name=name, requires_box=requires_box, label_set="lesion")
        return types.SimpleNamespace(facts=facts, eval=lambda: types.SimpleNamespace(facts=facts))

    methods = {"dbsam": fake("dbsam", True), "cmaa": fake("cmaa", False)}
    monkeypatch.setattr(bench, "make_case", make_case)
    monkeypatch.setattr(bench, "segment_images", segment_images)
    monkeypatch.setattr(bench, "resolve_method", lambda name, weights: methods[name])
    out = tmp_path / "results.json"
    assert bench.main(["--no-unet2d", "--cases", "2", "--model", "box=dbsam", "--model", "auto=cmaa",
                       "--out", str(out)]) == 0
    # truth: z 2-5, y 4-11, x 4-11 -> Box(x0, y0, z0, x1, y1, z1)
    assert calls == [("dbsam", Box(4, 4, 2, 11, 11, 5)), ("cmaa", None), ("cmaa", None)]
    results = json.loads(out.read_text())["groups"]["synth_training"]
    assert results["box cc>=0.1ml"]["summary"]["cases"] == 1 and results["auto cc>=0.1ml"]["summary"]["cases"] == 2
    assert results["box cc>=0.1ml p>=0.6"]["summary"]["WT_dice"] == 1.0  # the unsure speck dropped
    assert results["box cc>=0.1ml"]["summary"]["fp_lesions_per_case"] == 1  # 0.5 ml: kept by size
    assert results["box cc>=0.5ml"]["summary"]["fp_lesions_per_case"] == 1
    assert results["box cc>=0.1ml p>=0.9"]["summary"]["fp_lesions_per_case"] == 0
