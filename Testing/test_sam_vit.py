"""SAM ViT-B backbone: parity with segment-anything's own build, resizing to 256, the checkpoint loader."""
import pytest
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling.image_encoder import get_rel_pos

from BrainLesionSAMLib.backbones.sam_vit import (VIT_B, VIT_H, VIT_L, SamViTB, adapt_state_dict,
                                                 load_sam_checkpoint, load_sam_weights)
from BrainLesionSAMLib.errors import WeightsError

GLOBAL_BLOCKS = (2, 5, 8, 11)
WINDOWED_BLOCKS = tuple(i for i in range(12) if i not in GLOBAL_BLOCKS)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def reference_state():
    """A random SAM ViT-B state dict at 1024 from segment-anything's own builder. Its position
    embedding and relative-position tables start at zero there, so they are randomised too: the
    resizing and the parity must see real values."""
    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, value in state.items():
        if key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            state[key] = 0.02 * torch.randn(value.shape, generator=generator)
    return state


def test_parity_with_segment_anything_at_1024(reference_state):
    reference = sam_model_registry["vit_b"]()
    reference.load_state_dict(reference_state)
    ours, report = load_sam_checkpoint(reference_state, image_size=1024, require_complete=True)
    assert report.complete and not report.resized_keys
    reference.eval()
    torch.manual_seed(2)
    image = 255 * torch.rand(1, 3, 1024, 1024)
    box = torch.tensor([[100.0, 200.0, 600.0, 700.0]])
    with torch.no_grad():
        embedding = reference.image_encoder(reference.preprocess(image))
        sparse, dense = reference.prompt_encoder(points=None, boxes=box, masks=None)
        expected, _ = reference.mask_decoder(embedding, reference.prompt_encoder.get_dense_pe(),
                                             sparse, dense, multimask_output=False)
        our_embedding = ours.encode(ours.normalize(image))
        ours_masks = ours.decode(our_embedding, box)
    assert ours_masks.shape == (1, 1, 256, 256)
    embedding_diff = (our_embedding - embedding).abs().max().item()
    mask_diff = (ours_masks - expected).abs().max().item()
    print(f"parity at 1024: max |diff| embedding {embedding_diff:.3g}, mask logits {mask_diff:.3g}")
    assert embedding_diff < 1e-5
    assert mask_diff < 1e-5


def test_256_variant_loads_every_key_and_resizes_like_sam(reference_state):
    model, report = load_sam_checkpoint(reference_state, image_size=256)
    assert report.missing_keys == [] and report.unexpected_keys == [] and report.complete
    assert sorted(report.resized_keys) == sorted(
        ["image_encoder.pos_embed"] + [f"image_encoder.blocks.{i}.attn.rel_pos_{a}"
                                       for i in GLOBAL_BLOCKS for a in "hw"])
    state = model.state_dict()
    original = reference_state["image_encoder.pos_embed"]
    independent = F.interpolate(original.permute(0, 3, 1, 2), size=(16, 16), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
    assert state["image_encoder.pos_embed"].shape == (1, 16, 16, 768)
    torch.testing.assert_close(state["image_encoder.pos_embed"], independent, rtol=0, atol=0)
    for i in GLOBAL_BLOCKS:
        for axis in "hw":
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            assert state[key].shape == (31, 64)
            # What SAM itself would compute at run time from the 127-long table.
            torch.testing.assert_close(get_rel_pos(16, 16, state[key]),
                                       get_rel_pos(16, 16, reference_state[key]))
    for i in WINDOWED_BLOCKS:
        key = f"image_encoder.blocks.{i}.attn.rel_pos_h"
        assert state[key].shape == (27, 64)
        assert torch.equal(state[key], reference_state[key])
    # adapt_state_dict copies: the checkpoint itself is left as it was.
    assert reference_state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert adapt_state_dict(reference_state, 1024)["image_encoder.pos_embed"] is original

    with torch.no_grad():
        embedding = model.encode(model.normalize(255 * torch.rand(1, 3, 256, 256)))
        assert embedding.shape == (1, 256, 16, 16)
        assert model.decode(embedding).shape == (1, 1, 64, 64)  # no prompt at all
        # A batch of images with one box each is decoded image by image.
        embeddings = torch.randn(2, 256, 16, 16)
        boxes = torch.tensor([[20.0, 30.0, 120.0, 200.0], [0.0, 0.0, 255.0, 255.0]])
        batched = model.decode(embeddings, boxes)
        assert batched.shape == (2, 1, 64, 64)
        for i in range(2):
            torch.testing.assert_close(batched[i:i + 1], model.decode(embeddings[i:i + 1], boxes[i:i + 1]))


def test_decoder_tensors_come_from_the_checkpoint(reference_state):
    model, _ = load_sam_checkpoint(reference_state, image_size=256)
    state = model.state_dict()
    decoder_keys = [k for k in reference_state if k.startswith(("mask_decoder.", "prompt_encoder."))]
    for prefix in ("mask_decoder.mask_tokens", "mask_decoder.iou_token", "mask_decoder.output_hypernetworks_mlps.3",
                   "mask_decoder.iou_prediction_head", "prompt_encoder.pe_layer"):
        assert any(k.startswith(prefix) for k in decoder_keys), prefix
    for key in decoder_keys:
        assert torch.equal(state[key], reference_state[key]), key


def test_parameter_counts():
    sam_1024, sam_256 = SamViTB(1024), SamViTB(256)
    assert count(sam_1024.image_encoder) == 89_670_912
    assert count(sam_256.image_encoder) == 86_672_640
    assert count(sam_1024.prompt_encoder) == count(sam_256.prompt_encoder) == 6_220
    assert count(sam_1024.mask_decoder) == 4_058_340
    assert count(sam_1024) == 93_735_472
    assert set(sam_1024.state_dict()) == set(sam_model_registry["vit_b"]().state_dict())


def fake_encoder_state(embed_dim: int, depth: int) -> dict[str, torch.Tensor]:
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 16, 16),
             "image_encoder.pos_embed": torch.zeros(1, 64, 64, embed_dim)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(embed_dim) for i in range(depth)})
    return state


@pytest.mark.parametrize("architecture", [VIT_L, VIT_H], ids=lambda a: a.name)
def test_other_architectures_are_refused_naming_both(architecture):
    state = fake_encoder_state(architecture.embed_dim, architecture.depth)
    with pytest.raises(WeightsError) as error:
        load_sam_checkpoint(state, image_size=256)
    message = str(error.value)
    assert f"SAM {architecture.name} (embed dim {architecture.embed_dim}, {architecture.depth} blocks)" in message
    assert "expected SAM ViT-B (768, 12)" in message


def test_foreign_checkpoints_are_refused():
    lite = {"image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3),
            "image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(1)}
    with pytest.raises(WeightsError, match="LiteMedSAM"):
        load_sam_checkpoint(lite, image_size=256)
    with pytest.raises(WeightsError, match="not a SAM checkpoint"):
        load_sam_checkpoint({"net.0.weight": torch.zeros(3)}, image_size=256)
    wrong_patch = fake_encoder_state(VIT_B.embed_dim, VIT_B.depth)
    wrong_patch["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 1, 16, 16)
    with pytest.raises(WeightsError, match="patch embedding"):
        load_sam_checkpoint(wrong_patch, image_size=256)


def test_truncated_checkpoint_reports_missing_and_unexpected_keys(reference_state):
    dropped = [k for k in reference_state
               if k.startswith(("mask_decoder.iou_prediction_head.", "image_encoder.blocks.11.mlp."))]
    state = {k: v for k, v in reference_state.items() if k not in dropped}
    state["extra.weight"] = torch.zeros(2)
    state["pixel_mean"] = torch.zeros(3, 1, 1)  # saved by some forks: ignored, not unexpected
    model = SamViTB(256)
    report = load_sam_weights(model, state)
    assert sorted(report.missing_keys) == sorted(dropped)
    assert report.unexpected_keys == ["extra.weight"]
    assert report.ignored_keys == ["pixel_mean"]
    assert not report.complete
    summary = report.summary()
    assert "INCOMPLETE" in summary and f"missing (left at their initial values): {len(dropped)}" in summary
    assert "mask_decoder: 6" in summary and "extra.weight" in summary
    with pytest.raises(WeightsError, match="mask_decoder.iou_prediction_head"):
        load_sam_weights(model, state, require_complete=True)
    # A tensor whose shape no resizing explains is an error that names it.
    state = dict(reference_state)
    state["image_encoder.blocks.0.attn.rel_pos_h"] = torch.zeros(13, 64)
    with pytest.raises(WeightsError, match=r"blocks\.0\.attn\.rel_pos_h: file \[13, 64\], model \[27, 64\]"):
        load_sam_weights(model, state)


def test_files(reference_state, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        load_sam_checkpoint(text)
    with pytest.raises(WeightsError, match="does not exist"):
        load_sam_checkpoint(tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="not a file"):
        load_sam_checkpoint(tmp_path)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_sam_checkpoint(tensor_only)

    path = tmp_path / "sam_vit_b.pth"
    torch.save(reference_state, path)
    model, report = load_sam_checkpoint(path, image_size=256, require_complete=True)
    assert report.source == str(path) and report.complete
    loaded = model.state_dict()
    for key in ("mask_decoder.mask_tokens.weight", "image_encoder.blocks.3.attn.qkv.weight"):
        assert torch.equal(loaded[key], reference_state[key])
    assert not model.training

    # Training-script layouts: wrapped under 'model' / 'state_dict', DataParallel's 'module.' prefix.
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in reference_state.items()}}
    _, report = load_sam_checkpoint(wrapped, image_size=256, require_complete=True)
    assert any("'state_dict'" in note for note in report.notes)
    assert any("module." in note for note in report.notes)
