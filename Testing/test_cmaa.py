"""CMAA on CPU at 256 with random SAM weights (and the LiteMedSAM backbone with its real weights):
shapes, missing modalities, what is frozen, one step."""
import pytest
import torch

from BrainLesionSAMLib.methods import MethodFacts
from BrainLesionSAMLib.methods.cmaa import CMAA, build_loss, stream_inputs

# Independent counts (METHODS.md): SAM ViT-B parts at 256 input, six 1536 -> 768 1x1 convs,
# two 2 -> 3 1x1 convs.
ENCODER_256, ENCODER_1024, PROMPT_ENCODER, MASK_DECODER = 86_672_640, 89_670_912, 6_220, 4_058_340
ADAPTERS = 6 * (1536 * 768 + 768)
INPUT_CONVS = 2 * (2 * 3 + 3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CMAA().eval()


def test_facts_and_config():
    facts: MethodFacts = CMAA.facts
    assert facts.name == "cmaa" and facts.label_set == "lesion" and facts.labels == (0, 1)
    assert facts.modalities == ("t1", "t1ce", "t2", "flair") and facts.required_modalities == ()
    assert facts.tolerates_missing and facts.spatial_dims == 2 and facts.input_size == (256, 256)
    assert not facts.promptable and not facts.cacheable_embeddings
    config = CMAA.default_config
    assert (config["image_size"], config["adapter_blocks"], config["backbone_weights"]) == (256, 6, None)
    assert (config["optimizer"], config["learning_rate"], config["batch_size"]) == ("adamw", 1e-3, 24)
    with pytest.raises(ValueError, match="unknown config"):
        CMAA(adapters=3)


def test_parameter_counts_and_trainable_set(model):
    counts = model.parameter_counts()
    assert counts["total"] == ENCODER_256 + PROMPT_ENCODER + MASK_DECODER + ADAPTERS + INPUT_CONVS == 97_819_714
    assert counts["trainable"] == MASK_DECODER + ADAPTERS + INPUT_CONVS == 11_140_854
    # Paper (Table 3): 98M in all, 10.80M trained.
    assert abs(counts["total"] / 98e6 - 1) < 0.05 and abs(counts["trainable"] / 10.80e6 - 1) < 0.05
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters()
                if name.startswith(("input_convs.", "adapters.", "backbone.mask_decoder."))}
    assert trainable == expected
    assert {name.split(".")[1] for name in trainable if name.startswith("adapters.")} == set("012345")
    model.train()
    try:
        assert not model.backbone.image_encoder.training and not model.backbone.prompt_encoder.training
        assert model.backbone.mask_decoder.training and model.adapters.training
    finally:
        model.eval()


def test_stream_inputs_fill_missing_modalities():
    t1, t1ce, t2, flair = (torch.full((1, 2, 2), float(v)) for v in (1, 2, 3, 4))
    images = torch.stack([t1, t1ce, t2, flair], dim=1).expand(3, -1, -1, -1)
    available = torch.tensor([[True, True, True, True],
                              [True, False, False, True],    # one of each pair
                              [False, True, False, False]])  # T1CE only
    s1, s2 = stream_inputs(images, available, "copy_other")
    assert s1[:, :, 0, 0].tolist() == [[1, 2], [1, 1], [2, 2]]
    assert s2[:, :, 0, 0].tolist() == [[3, 4], [4, 4], [2, 2]]  # last: the T1 stream's pair
    s1, s2 = stream_inputs(images, available, "zeros")
    assert s1[2, :, 0, 0].tolist() == [2, 2] and s2[2].abs().sum() == 0


def test_forward_shape_probabilities_and_missing_modality(model):
    torch.manual_seed(1)
    full = 255 * torch.rand(1, 4, 256, 256)
    partial = full.clone()
    partial[:, [1, 2]] = 0  # T1 and FLAIR only; the engine zero-fills missing channels
    # The same images with the missing one of each pair replaced by its partner.
    duplicated = torch.stack([full[:, 0], full[:, 0], full[:, 3], full[:, 3]], dim=1)
    images = torch.cat([partial, duplicated])
    available = torch.tensor([[True, False, False, True], [True, True, True, True]])
    with torch.no_grad():
        probabilities = model.predict_proba(images, available)
    assert probabilities.shape == (2, 2, 256, 256) and torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 256, 256))
    torch.testing.assert_close(probabilities[0], probabilities[1], atol=1e-5, rtol=1e-4)


def test_one_adamw_step_trains_only_the_trainable_part(lesion_batch):
    images, available, target = lesion_batch
    assert images.shape == (2, 4, 256, 256) and target.shape == (2, 1, 256, 256) and target.any()
    torch.manual_seed(0)
    model = CMAA().train()
    encoder_before = {k: v.clone() for k, v in model.backbone.image_encoder.state_dict().items()}
    prompt_before = {k: v.clone() for k, v in model.backbone.prompt_encoder.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in model.adapters.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.backbone.mask_decoder.state_dict().items()}
    config = model.config
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=config["learning_rate"], weight_decay=config["weight_decay"])

    logits = model(images, available)
    assert logits.shape == (2, 2, 256, 256)
    assert torch.equal(logits[:, 0], torch.zeros_like(logits[:, 0]))  # [0, x]: softmax = sigmoid(x)
    loss_before = model.loss(logits, target)
    optimiser.zero_grad()
    loss_before.backward()
    optimiser.step()

    for part in (model.backbone.image_encoder, model.backbone.prompt_encoder):
        assert all(p.grad is None for p in part.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.backbone.image_encoder.state_dict().items())
    assert all(torch.equal(v, prompt_before[k]) for k, v in model.backbone.prompt_encoder.state_dict().items())
    adapters_after = model.adapters.state_dict()
    for i in range(6):
        key = f"{i}.fuse.weight"
        assert not torch.equal(adapters_after[key], adapters_before[key]), key
    assert not torch.equal(model.backbone.mask_decoder.state_dict()["output_upscaling.0.weight"],
                           decoder_before["output_upscaling.0.weight"])

    with torch.no_grad():
        loss_after = model.loss(model(images, available), target)
    print(f"cmaa one AdamW step: loss {loss_before.item():.4f} -> {loss_after.item():.4f}")
    assert loss_after < loss_before


def test_loss_is_dice_plus_ce_of_the_lesion_logit():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    target = torch.rand(2, 8, 8) > 0.5
    logits = torch.cat([torch.zeros_like(x), x], dim=1)
    probability = torch.sigmoid(x)[:, 0]
    t = target.float()
    dice = 1 - (2 * (probability * t).sum() + 1e-5) / (probability.sum() + t.sum() + 1e-5)
    ce = torch.nn.functional.cross_entropy(logits, target.long())
    torch.testing.assert_close(build_loss()(logits, target), dice + ce)
    torch.testing.assert_close(build_loss({"lambda_dice": 0.5, "lambda_ce": 2.0})(logits, target),
                               0.5 * dice + 2 * ce)


def test_backbone_weights_and_other_input_sizes(tmp_path):
    """``backbone_weights`` initialises encoder and decoder (resized to the configured input size);
    an input size other than 256 resizes the slices inside and returns 256 x 256 logits."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    state = sam_model_registry["vit_b"]().state_dict()
    path = tmp_path / "sam_vit_b.pth"
    torch.save(state, path)
    model = CMAA(image_size=128, backbone_weights=str(path)).eval()
    loaded = model.state_dict()
    assert loaded["backbone.image_encoder.pos_embed"].shape == (1, 8, 8, 768)
    for key in ("mask_decoder.mask_tokens.weight", "mask_decoder.iou_prediction_head.layers.2.bias",
                "image_encoder.blocks.7.mlp.lin1.weight"):
        assert torch.equal(loaded[f"backbone.{key}"], state[key])
    with torch.no_grad():
        logits = model(255 * torch.rand(1, 4, 256, 256), torch.ones(1, 4, dtype=torch.bool))
    assert logits.shape == (1, 2, 256, 256)

    from BrainLesionSAMLib.errors import WeightsError
    with pytest.raises(WeightsError, match="does not exist"):
        CMAA(backbone_weights=str(tmp_path / "absent.pth"))
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match="mask_decoder.iou_token.weight"):
        CMAA(image_size=128, backbone_weights=str(path))


# LiteMedSAM backbone: TinyViT's widths after its first six blocks, 1x1 convs 2c -> c.
LITE_ENCODER, LITE_ADAPTER_WIDTHS = 5_726_740, (64, 128, 128, 160, 160, 160)


def test_lite_backbone_counts_weights_and_one_step(lesion_batch):
    """backbone 'lite': adapters at TinyViT's block widths, encoder from the real lite_medsam.pth,
    frozen (BatchNorm statistics included), and one AdamW step lowers the loss."""
    from BrainLesionSAMLib.backbones.litemedsam import load_lite_medsam_state

    torch.manual_seed(0)
    model = CMAA(backbone="lite").train()
    adapters = sum(2 * c * c + c for c in LITE_ADAPTER_WIDTHS)
    counts = model.parameter_counts()
    assert counts["total"] == LITE_ENCODER + PROMPT_ENCODER + MASK_DECODER + adapters + INPUT_CONVS == 10_019_446
    assert counts["trainable"] == MASK_DECODER + adapters + INPUT_CONVS
    assert [a.fuse.out_channels for a in model.adapters] == list(LITE_ADAPTER_WIDTHS)
    published = load_lite_medsam_state()
    encoder = model.backbone.image_encoder.state_dict()
    assert all(torch.equal(encoder[k.removeprefix("image_encoder.")], v)
               for k, v in published.items() if k.startswith("image_encoder."))
    assert not model.backbone.image_encoder.training  # BatchNorm of the frozen TinyViT keeps its statistics

    images, available, target = lesion_batch
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits = model(images, available)
    assert logits.shape == (2, 2, 256, 256)
    loss_before = model.loss(logits, target)
    optimiser.zero_grad()
    loss_before.backward()
    optimiser.step()
    assert all(p.grad is None for p in model.backbone.image_encoder.parameters())
    encoder_after = model.backbone.image_encoder.state_dict()
    assert all(torch.equal(encoder_after[k], v) for k, v in encoder.items())
    with torch.no_grad():
        loss_after = model.loss(model(images, available), target)
    print(f"cmaa (lite) one AdamW step: loss {loss_before.item():.4f} -> {loss_after.item():.4f}")
    assert loss_after < loss_before


def test_lite_backbone_rejects_other_sizes_and_unknown_backbones():
    for size in (1024, 100, 32):
        with pytest.raises(ValueError, match="smaller multiple of 64"):
            CMAA(backbone="lite", image_size=size)
    with pytest.raises(ValueError, match="unknown backbone 'vit_h'"):
        CMAA(backbone="vit_h")


def test_cmaa_starts_as_backbone(lesion_batch):
    """At initialisation CMAA is its frozen backbone (LiteMedSAM, real weights) with nothing added:
    each stream's encoder sees its pair's mean image and runs unchanged (adapters C = 0), and the
    decoder gets the two streams' summed embeddings (eq. 1-2 and the paper's sum), so its output is
    that of the backbone's own encoder forward (no block hooks) on the two pair means, summed, then
    its prompt-less decoder; within float tolerance. Non-zero adapters change it."""
    images, available, _ = lesion_batch
    torch.manual_seed(0)
    model = CMAA(backbone="lite").eval()
    backbone = model.backbone
    t1_mean = ((images[:, 0] + images[:, 1]) / 2)[:, None].expand(-1, 3, -1, -1)
    t2_mean = ((images[:, 2] + images[:, 3]) / 2)[:, None].expand(-1, 3, -1, -1)
    with torch.no_grad():
        logits = model(images, available)
        embeddings = (backbone.image_encoder(backbone.normalize(t1_mean))
                      + backbone.image_encoder(backbone.normalize(t2_mean)))
        reference = backbone.decode(embeddings, boxes=None)
    assert available.all() and reference.shape == (2, 1, 256, 256)
    torch.testing.assert_close(logits[:, 1:], reference, atol=2e-3, rtol=1e-3)
    assert reference.abs().max() > 1.0
    torch.manual_seed(0)
    adapted = CMAA(backbone="lite", adapter_zero_init=False).eval()
    with torch.no_grad():
        assert (adapted(images, available)[:, 1:] - reference).abs().max() > 1e-2


def test_lite_backbone_at_128_is_the_same_network_on_half_the_grids(lesion_batch):
    """The CPU release (image_size 128): LiteMedSAM's weights load unchanged, every feature grid is
    half of the 256 build's, the decoder's 32 x 32 mask comes back at the engine's 256 slice, and the
    output depends on the input."""
    from BrainLesionSAMLib.backbones.litemedsam import load_lite_medsam_state

    small, full = CMAA(backbone="lite", image_size=128).eval(), CMAA(backbone="lite").eval()
    assert small.backbone.block_grids == tuple(g // 2 for g in full.backbone.block_grids)
    assert (small.backbone.image_size, small.backbone.embedding_size) == (128, 32)
    published = load_lite_medsam_state()
    state = small.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in published.items())
    assert small.parameter_counts() == full.parameter_counts()
    images, available, _ = lesion_batch
    with torch.no_grad():
        logits = small(images, available)
    assert logits.shape == (2, 2, 256, 256) and torch.isfinite(logits).all()
    assert (logits[0, 1] - logits[1, 1]).abs().max() > 1e-3  # two different slices, two different outputs


def test_release_export_is_a_delta_on_litemedsam_that_loads_back(tmp_path):
    """`brainlesionsam-train --export RUN --delta`: the file holds the trained tensors only (no
    encoder tensor), names LiteMedSAM as its base, and loads back to the very same network."""
    import json

    from safetensors import safe_open

    from BrainLesionSAMLib.checkpoints import load_method, read_header, save_checkpoint
    from BrainLesionSAMLib.backbones.litemedsam import LITE_MEDSAM_SHA256
    from Training.export import export_run

    torch.manual_seed(0)
    model = CMAA(backbone="lite", image_size=128)
    with torch.no_grad():
        model.adapters[0].fuse.weight.normal_(0, 0.01)
        model.backbone.mask_decoder.output_upscaling[0].weight.add_(0.01)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(model, run / "final.safetensors", training_data="unit test")
    (run / "config.json").write_text(json.dumps({"name": "cmaa_release", "method": "cmaa",
                                                 "data": {"root": str(run)}}))
    entry = export_run(run, tmp_path / "cmaa.safetensors", which="final", delta=True)
    path = tmp_path / "cmaa.safetensors"
    assert read_header(path)["base"]["sha256"] == LITE_MEDSAM_SHA256
    assert entry["config"] == {"backbone": "lite", "image_size": 128}
    with safe_open(str(path), "pt") as handle:
        names = set(handle.keys())
    assert "adapters.0.fuse.weight" in names and "backbone.mask_decoder.output_upscaling.0.weight" in names
    assert not any(name.startswith(("backbone.image_encoder.", "backbone.prompt_encoder.")) for name in names)
    assert path.stat().st_size < 25e6
    loaded = load_method("cmaa", path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
