"""The engine's precision (issue 22): 'fp32' is the network's plain float32 result bit for bit,
'bf16' autocast on the CPU returns float32 probabilities that agree with fp32, and 'auto' picks
bf16 exactly where the CPU has native bf16 and the method's facts say it was measured safe.
No timings here: docs/benchmarks.md ("CPU precision") has them, from benchmarks/bench_precision.py."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib import engine as engine_module
from BrainLesionSAMLib.checkpoints import load_method
from BrainLesionSAMLib.cli import build_parser, main
from BrainLesionSAMLib.engine import InferenceEngine, cpu_has_native_bf16, resolve_precision
from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.methods import get_method_class
from BrainLesionSAMLib.metrics import evaluate_labels
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, SampleParameters, generate_case

from conftest import blob_case
from test_cli import run_cli, segment_args


@pytest.fixture(scope="module")
def blob():
    images, _ = blob_case((9, 40, 48), spacing=(1.0, 1.2, 2.5))
    return prepare_case(images)


def small_unet(cpu_bf16: bool):
    """A small, seeded unet2d whose facts say ``cpu_bf16`` (an unregistered subclass)."""
    cls = get_method_class("unet2d")
    declared = type(f"UNet2DCpuBf16{cpu_bf16}", (cls,), {"facts": dataclasses.replace(cls.facts, cpu_bf16=cpu_bf16)})
    torch.manual_seed(0)
    return declared(channels=(4, 8), strides=(2,)).eval()


def plain_fp32_probabilities(model, case) -> np.ndarray:
    """[K, Z, Y, X]: every brain slice through the network alone, float32, no autocast, no engine."""
    geometry = case.slice_geometry
    out = np.zeros((len(model.facts.labels),) + case.shape_zyx, np.float32)
    out[0] = 1.0
    available = torch.as_tensor(case.available)[None]
    for z in case.brain_slices():
        with torch.inference_mode():
            out[:, z] = geometry.from_network(model.predict_proba(case.network_slices([z]), available))[0].numpy()
    out[:, ~case.brain_mask] = 0.0
    out[0, ~case.brain_mask] = 1.0
    return out


def probabilities_of(result) -> np.ndarray:
    return np.moveaxis(sitk.GetArrayFromImage(result.probabilities), -1, 0)


def test_fp32_is_the_plain_network_bit_for_bit_and_what_amp_gave_on_the_cpu(monkeypatch, blob):
    # where 'auto' would pick bf16 (native bf16, a method declared safe), 'fp32' and amp must not autocast
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)
    model = small_unet(cpu_bf16=True)
    expected = plain_fp32_probabilities(model, blob)
    runs = {"fp32": InferenceEngine(model, "cpu", precision="fp32", min_component_ml=0, min_component_confidence=0),
            # the engine's old default call: amp=True was autocast on CUDA only, float32 on the CPU
            "amp=True": InferenceEngine(model, "cpu", amp=True, min_component_ml=0, min_component_confidence=0),
            "amp=False": InferenceEngine(model, "cpu", amp=False, min_component_ml=0, min_component_confidence=0)}
    for name, engine in runs.items():
        result = engine.segment(blob, return_probabilities=True)
        assert engine.precision == result.precision == "fp32", name
        np.testing.assert_array_equal(probabilities_of(result), expected, err_msg=name)


@pytest.fixture(scope="module")
def sample_slices():
    """Eight lesion slices of the embedded sample case (1 mm) and their ground truth."""
    images = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1))
    truth = sitk.GetArrayFromImage(images.pop("seg"))
    centre = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    z = slice(centre - 4, centre + 4)
    slab = {m: image[:, :, z] for m, image in images.items()}
    return prepare_case(slab), truth[z]


def test_bf16_on_the_cpu_gives_float32_probabilities_that_agree_with_fp32(sample_slices):
    case, truth = sample_slices
    method = load_method("unet2d")  # the packaged, trained weights: agreement that means something
    results = {p: InferenceEngine(method, "cpu", precision=p).segment(case, return_probabilities=True)
               for p in ("fp32", "bf16")}
    assert results["bf16"].precision == "bf16" and results["bf16"].device == "cpu"
    probabilities = {p: sitk.GetArrayFromImage(r.probabilities) for p, r in results.items()}
    assert probabilities["bf16"].dtype == np.float32
    np.testing.assert_allclose(probabilities["bf16"].sum(-1), 1.0, atol=1e-5)
    difference = np.abs(probabilities["bf16"] - probabilities["fp32"])
    # Measured (docs/benchmarks.md): max 0.03 on these slices; bf16 rounds each product to 8 bits.
    assert 0 < difference.max() < 0.1, "bf16 should differ (it ran) but only a little"
    labels = {p: sitk.GetArrayFromImage(r.labels) for p, r in results.items()}
    agreement = evaluate_labels(labels["bf16"], labels["fp32"], (1.0, 1.0, 1.0))
    truth_fp32 = evaluate_labels(labels["fp32"], truth, (1.0, 1.0, 1.0))
    truth_bf16 = evaluate_labels(labels["bf16"], truth, (1.0, 1.0, 1.0))
    for region in ("WT", "TC", "ET"):
        assert agreement[region]["dice"] >= 0.99, region
        assert abs(truth_bf16[region]["dice"] - truth_fp32[region]["dice"]) <= 0.002, region


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("safe", [True, False])
def test_auto_picks_bf16_only_on_native_bf16_for_a_method_measured_safe(monkeypatch, blob, native, safe):
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: native)
    method = small_unet(safe)
    engine = InferenceEngine(method, "cpu")  # precision='auto' is the default
    expected = "bf16" if native and safe else "fp32"
    assert engine.precision == expected
    assert engine.segment(blob).precision == expected
    # asked for explicitly, the precision is what was asked; the older amp switch never autocasts on the CPU
    assert InferenceEngine(method, "cpu", precision="bf16").precision == "bf16"
    assert InferenceEngine(method, "cpu", precision="fp32").precision == "fp32"
    assert InferenceEngine(method, "cpu", amp=True).precision == "fp32"


def test_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch):
    cuda = torch.device("cuda")
    for supported, expected in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: supported)
        assert resolve_precision("auto", cuda, cpu_bf16_safe=False) == expected
    assert resolve_precision("fp32", cuda, cpu_bf16_safe=True) == "fp32"
    with pytest.raises(BrainLesionSAMError, match="unknown precision 'fp8'; use fp32, bf16, auto"):
        resolve_precision("fp8", torch.device("cpu"), cpu_bf16_safe=True)


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    def cpuinfo(flags: str):
        path = tmp_path / f"cpuinfo_{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nmodel name\t: some CPU\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nflags\t\t: {flags}\n")
        return str(path)

    assert cpu_has_native_bf16(cpuinfo("fpu sse2 avx2 avx512f avx512_vnni avx512_bf16")) is True
    assert cpu_has_native_bf16(cpuinfo("fpu sse2 avx2 amx_tile amx_bf16 amx_int8")) is True
    assert cpu_has_native_bf16(cpuinfo("fpu sse2 avx2 avx512f avx512_vnni")) is False
    # no /proc/cpuinfo (macOS, Windows): torch's own answer, a bool either way
    assert isinstance(cpu_has_native_bf16(str(tmp_path / "absent")), bool)


def test_methods_declare_cpu_bf16_and_info_shows_it():
    for name in ("unet2d", "litemedsam", "sofa", "cmaa", "dbsam", "brainsegdmif", "medsam", "mome"):
        facts = get_method_class(name).facts
        assert isinstance(facts.cpu_bf16, bool)
        assert facts.as_dict()["cpu_bf16"] == facts.cpu_bf16


def test_cli_accepts_precision_and_rejects_a_bad_value(capsys, monkeypatch, cases_root, weights, tmp_path):
    parser = build_parser()
    for command in (["segment", "--out", "o.nii.gz", "--method", "unet2d"], ["batch", "--input", "i", "--output", "o",
                                                                            "--method", "unet2d"], ["demo"]):
        assert parser.parse_args(command).precision == "auto"
        assert parser.parse_args(command + ["--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--flair", "x.nii.gz", "--method", "unet2d", "--out", str(tmp_path / "o.nii.gz"),
              "--precision", "fp8"])
    assert exit_info.value.code == 2
    assert "argument --precision: invalid choice: 'fp8'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    # the chosen precision reaches the engine and the report's record of the run
    case_dir = sorted(p for p in cases_root.iterdir() if p.is_dir())[0]
    report = tmp_path / "report"
    code, _, stderr = run_cli(capsys, segment_args(weights, tmp_path / "labels.nii.gz", "--case-dir", case_dir,
                                                   "--precision", "bf16", "--report", report,
                                                   "--box", "30,35,25,85,90,28"))  # four slices: quick
    assert code == 0, stderr
    payload = json.loads(next(report.glob("*_volumes.json")).read_text())
    assert payload["device"] == "cpu" and payload["precision"] == "bf16"


def test_litemedsam_bf16_with_a_box_agrees_with_fp32_and_its_cached_refinement_is_the_same(sample_slices):
    """The embedding cache under bf16: a second box re-uses bf16 embeddings (kept apart from fp32 ones)
    and gives what an uncached bf16 run gives."""
    from BrainLesionSAMLib.engine import Box, EmbeddingCache

    case, truth = sample_slices
    z, y, x = np.nonzero(truth[3:6])
    box = Box(int(x.min()), int(y.min()), 3, int(x.max()), int(y.max()), 5)  # three slices: the encoder is slow
    method = get_method_class("litemedsam").pretrained()  # the published weights (the default is brain-tuned)
    cache = EmbeddingCache()
    labels = {}
    for precision in ("fp32", "bf16"):
        engine = InferenceEngine(method, "cpu", precision=precision, embedding_cache=cache)
        labels[precision] = sitk.GetArrayFromImage(engine.segment(case, box=box).labels)
    assert len(cache) == 6, "fp32 and bf16 embeddings are cached apart"
    agreement = evaluate_labels(labels["bf16"], labels["fp32"], (1.0, 1.0, 1.0), label_set="lesion")
    assert agreement["lesion"]["dice"] >= 0.98  # measured 0.994 (docs/benchmarks.md)
    smaller = dataclasses.replace(box, x0=box.x0 + 3, y0=box.y0 + 3)
    cached = engine.segment(case, box=smaller, return_probabilities=True)
    assert len(cache) == 6, "the refinement encoded nothing"
    plain = InferenceEngine(method, "cpu", precision="bf16").segment(case, box=smaller, return_probabilities=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(cached.probabilities), sitk.GetArrayFromImage(plain.probabilities))
