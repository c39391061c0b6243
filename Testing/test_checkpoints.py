"""Checkpoints: safetensors + JSON header, round trip, refusal of wrong or damaged files."""
import json

import pytest
import torch
from safetensors import safe_open

from BrainLesionSAMLib import __version__
from BrainLesionSAMLib.checkpoints import (HEADER_KEY, PACKAGED_WEIGHTS_DIR, load_checkpoint, load_method,
                                           read_header, save_checkpoint, verify_file_sha256)
from BrainLesionSAMLib.errors import UnknownMethodError, WeightsError
from BrainLesionSAMLib.methods import build_method, get_method_class


def test_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(3)
    model = build_method("unet2d", {"channels": (8, 16, 32), "strides": (2, 2)}).eval()
    path = save_checkpoint(model, tmp_path / "m.safetensors", training_data="unit test")
    loaded = load_method("unet2d", path)
    assert loaded.config["channels"] == [8, 16, 32]
    x = torch.rand(2, 4, 64, 64) * 255
    a = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(model(x, a), loaded(x, a), rtol=0, atol=0)
    header = read_header(path)
    assert header["method"] == "unet2d" and header["library_version"] == __version__
    assert header["labels"] == [0, 1, 2, 4] and header["training_data"] == "unit test"
    with safe_open(str(path), "pt") as handle:  # the header is plain safetensors metadata JSON
        assert json.loads(handle.metadata()[HEADER_KEY])["sha256"] == header["sha256"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_float16_storage_halves_the_file_and_loads_the_rounded_weights_into_float32(tmp_path):
    """Half-precision storage: float32 tensors on disk as float16, the file about half the size, the
    loaded network float32 with every weight equal to its float16 rounding and outputs within
    float16's rounding of the original's; a tensor float16 cannot hold stays float32."""
    from BrainLesionSAMLib.checkpoints import half_precision

    torch.manual_seed(3)
    model = build_method("unet2d", {"channels": (8, 16, 32), "strides": (2, 2)}).eval()
    full = save_checkpoint(model, tmp_path / "fp32.safetensors")
    half = save_checkpoint(model, tmp_path / "fp16.safetensors", storage="float16")
    assert read_header(half)["storage"] == "float16" and "storage" not in read_header(full)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    stored, _ = load_checkpoint(half)
    assert {v.dtype for k, v in stored.items() if model.state_dict()[k].dtype == torch.float32} == {torch.float16}
    loaded = load_method("unet2d", half)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype
        assert torch.equal(got, value.to(torch.float16).to(value.dtype) if value.is_floating_point() else value)
    x = torch.rand(2, 4, 64, 64) * 255
    a = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():
        assert (model.predict_proba(x, a) - loaded.predict_proba(x, a)).abs().max() < 0.02
    kept = half_precision({"big": torch.tensor([1e6, 1.0]), "small": torch.tensor([0.1]),
                           "count": torch.tensor(3)})
    assert (kept["big"].dtype, kept["small"].dtype, kept["count"].dtype) == (torch.float32, torch.float16, torch.int64)
    with pytest.raises(ValueError, match="storage"):
        save_checkpoint(model, tmp_path / "x.safetensors", storage="int8")


def test_weights_for_another_method_are_refused(tmp_path):
    model = build_method("unet2d")
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="holds weights for method 'unet2d', not 'sofa'"):
        load_checkpoint(path, expected_method="sofa")
    with pytest.raises(UnknownMethodError, match="unknown method 'nosuch'"):
        load_method("nosuch", path)


def test_damaged_and_foreign_files_are_refused(tmp_path):
    path = save_checkpoint(build_method("unet2d"), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # flip bits in the last tensor's bytes
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged"):
        load_checkpoint(damaged)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(WeightsError, match="not a BrainLesionSAM weights file"):
        read_header(text)
    with pytest.raises(WeightsError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")


def test_file_sha256_verification(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"abc")
    verify_file_sha256(path, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    with pytest.raises(WeightsError, match="sha256"):
        verify_file_sha256(path, "0" * 64)


def test_packaged_baseline_weights_load():
    path = PACKAGED_WEIGHTS_DIR / get_method_class("unet2d").packaged_weights
    assert path.is_file(), "run scripts/train_sample_weights.py to create the packaged weights"
    model = load_method("unet2d")
    assert not model.training
    assert "generated cases" in read_header(path)["training_data"]  # phantoms, not patients


def test_checkpoint_loads_where_the_initial_sam_file_is_absent(tmp_path):
    """A CMAA fine-tuned from a SAM .pth records that path; loading needs only our checkpoint."""
    torch.manual_seed(0)
    model = build_method("cmaa").eval()
    model.config["backbone_weights"] = str(tmp_path / "gone" / "sam_vit_b_01ec64.pth")
    path = save_checkpoint(model, tmp_path / "cmaa.safetensors")
    assert read_header(path)["config"]["backbone_weights"].endswith("sam_vit_b_01ec64.pth")
    loaded = load_method("cmaa", path)
    reference = model.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in loaded.state_dict().items())


def test_third_party_pth_goes_through_the_methods_own_reader(tmp_path):
    """--weights medsam_vit_b.pth: a .pth is read by the method's pretrained(weights) (here a SAM
    ViT-B state dict in the official layout, random values), not as one of our checkpoints."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "medsam_vit_b.pth"
    torch.save(state, path)
    model = load_method("medsam", path)
    assert not model.training and model.config["checkpoint"] == str(path)
    assert torch.equal(model.net.mask_decoder.state_dict()["mask_tokens.weight"], state["mask_decoder.mask_tokens.weight"])
    with pytest.raises(WeightsError, match="method 'unet2d' does not read third-party .pth files"):
        load_method("unet2d", path)


def test_zero_dim_tensors_round_trip(tmp_path):
    """Scalar parameters (e.g. a learnt temperature) hash and load like any other tensor."""
    model = build_method("unet2d", {"channels": (8, 16), "strides": (2,)})
    model.register_buffer("temperature", torch.tensor(0.5))
    path = save_checkpoint(model, tmp_path / "scalar.safetensors")
    state, _ = load_checkpoint(path, expected_method="unet2d")
    assert state["temperature"].shape == () and float(state["temperature"]) == 0.5
