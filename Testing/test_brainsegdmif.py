"""BrainSegDMIF on CPU: parameter counts and FLOPs (on the meta device, nothing allocated), the DMIF
softmax, the Table 3 switches, missing modalities, gradients and one Adam step.

Where a test is about logic the four ViT-B streams run at ``image_size`` 64 (4 x 4 tokens; the
engine's 256 x 256 slices are resized inside and the logits come back at 256): the same modules,
a sixteenth of the tokens."""
import dataclasses
import warnings

import pytest
import torch

from BrainLesionSAMLib.errors import MissingModalityError
from BrainLesionSAMLib.methods import MethodFacts, build_method
from BrainLesionSAMLib.methods.brainsegdmif import BrainSegDMIF, flops_per_slice
from BrainLesionSAMLib.methods.brainsegdmif_modules import (DynamicModalInteractiveFusion, FocalDiceLoss,
                                                            LayerByLayerUpsamplingDecoder, PromptGenerator)

# Independent counts. SAM ViT-B parts at 256 input (METHODS.md), its neck (1x1 conv 768 -> 256, LN,
# 3x3 conv 256 -> 256, LN), TinyViT's encoder and neck.
VIT_B_ENCODER, VIT_B_NECK = 86_672_640, 768 * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256
LITE_ENCODER, LITE_NECK = 5_726_740, 320 * 256 + 2 * 256 + 256 * 256 * 9 + 2 * 256
PROMPT_ENCODER, MASK_DECODER = 6_220, 4_058_340
FEEDBACK_GATES = 11 * 768   # 'gated' feedback: one per-channel gate after each of blocks 1-11


def dmif_parameters(dim: int, modalities: int, hidden: int) -> int:
    """W1 + LN + W2, the weight MLP D -> h -> D, gamma: M*D -> h -> D."""
    cat = dim * modalities
    return (cat * hidden + hidden) + 2 * hidden + (hidden * cat + cat) \
        + (dim * hidden + hidden + hidden * dim + dim) + (cat * hidden + hidden + hidden * dim + dim)


def attention_parameters(dim: int = 256, internal: int = 256) -> int:   # SAM's Attention: q, k, v, out
    return 3 * (dim * internal + internal) + internal * dim + dim


PG = attention_parameters() + 2 * attention_parameters(internal=128) + (256 * 2048 + 2048 + 2048 * 256 + 256) + 4 * 512


def lud_parameters(strides: tuple[int, ...], channels: int = 32) -> int:
    branches = sum(256 * channels * s * s + channels + 2 * channels + channels * channels * 9 + channels
                   for s in strides)
    modulators = len(strides) * (2 * (256 * 256 + 256) + 256 * channels + channels)
    return attention_parameters(internal=128) + 512 + branches + modulators


def build_on_meta(**config) -> BrainSegDMIF:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BrainSegDMIF(**config)


@pytest.fixture(scope="module")
def model():
    """The paper's network (four separate ViT-B streams, all modules) at 64 x 64 encoder input."""
    torch.manual_seed(0)
    return BrainSegDMIF(image_size=64).eval()


def test_facts_config_and_errors():
    facts: MethodFacts = BrainSegDMIF.facts
    assert facts.name == "brainsegdmif" and facts.label_set == "lesion" and facts.labels == (0, 1)
    assert facts.modalities == ("t1", "t1ce", "t2", "flair") and facts.required_modalities == ()
    assert facts.tolerates_missing and facts.spatial_dims == 2 and facts.input_size == (256, 256)
    assert not facts.promptable and not facts.cacheable_embeddings
    config = BrainSegDMIF.default_config
    assert (config["backbone"], config["image_size"], config["shared_encoder"], config["freeze_encoders"]) \
        == ("vit_b", 256, False, False)
    assert (config["optimizer"], config["learning_rate"], config["lr_milestones"], config["lr_gamma"]) \
        == ("adam", 1e-4, (7, 12), 0.5)
    assert (config["lambda_focal"], config["lambda_dice"]) == (0.5, 1.0)
    for bad, message in (({"heads": 2}, "unknown config"), ({"head": "tumour"}, "head must be"),
                         ({"modalities": ()}, "modalities must be"), ({"modalities": ["t1", "dwi"]}, "modalities"),
                         ({"fusion_feedback": "replace"}, "fusion_feedback"), ({"dmif": "yes"}, "dmif must be"),
                         ({"mask_tokens": 1}, "mask_tokens"), ({"head": "brats", "mask_tokens": 3}, "mask_tokens"),
                         ({"fusion_reduction": 0}, "fusion_reduction"), ({"backbone": "vit_h"}, "unknown backbone"),
                         ({"backbone": "lite", "image_size": 1024}, "smaller multiple of 64")):
        with pytest.raises(ValueError, match=message):
            build_on_meta(**bad)
    # An instance configured otherwise carries its own facts; the class keeps the default ones.
    brats = build_on_meta(head="brats", modalities=["flair", "t1", "t2"])
    assert brats.facts.label_set == "brats" and brats.facts.labels == (0, 1, 2, 4)
    assert brats.facts.modalities == ("t1", "t2", "flair") and len(brats.encoders) == 3
    assert BrainSegDMIF.facts.label_set == "lesion"
    assert dataclasses.replace(brats.facts, label_set="lesion", modalities=facts.modalities) == facts


def test_parameter_counts_match_the_parts_and_the_paper():
    method = build_on_meta()
    streams = 4 * VIT_B_ENCODER - 3 * VIT_B_NECK
    fusion = 12 * dmif_parameters(768, 4, 96) + FEEDBACK_GATES
    expected = streams + fusion + 4 * 256 + PG + lud_parameters((4, 8, 16))
    counts = method.parameter_counts()
    assert counts == {"total": expected, "trainable": expected} and expected == 362_581_472
    assert build_on_meta(fusion_feedback="add").parameter_counts()["total"] == expected - FEEDBACK_GATES
    assert abs(expected / 354e6 - 1) < 0.05   # paper: 354M
    assert [f.hidden for f in method.fusion] == [96] * 12
    # Only the first stream keeps a neck; no stream keeps SAM's prompt encoder / mask decoder
    # (PG and LUD replace them).
    assert hasattr(method.encoders[0].image_encoder, "neck")
    assert not any(hasattr(e.image_encoder, "neck") for e in method.encoders[1:])
    assert not any(hasattr(e, "prompt_encoder") or hasattr(e, "mask_decoder") for e in method.encoders)
    frozen = build_on_meta(freeze_encoders=True).parameter_counts()
    assert frozen["trainable"] == expected - streams
    shared = build_on_meta(shared_encoder=True)
    assert len(shared.encoders) == 1 and shared.parameter_counts()["total"] == expected - 3 * VIT_B_ENCODER + 3 * VIT_B_NECK


def test_ablation_switches_change_the_module_graph_and_still_run():
    """Table 3: each switch removes its module and puts SAM's part (or the streams' mean) instead;
    every combination gives logits at 256 x 256 (on the meta device: shapes only)."""
    full = build_on_meta().parameter_counts()["total"]
    images = torch.zeros(2, 4, 256, 256, device="meta")
    available = torch.ones(2, 4, dtype=torch.bool, device="meta")
    for dmif in (True, False):
        for pg in (True, False):
            for lud in (True, False):
                method = build_on_meta(dmif=dmif, prompt_generator=pg, upsampling_decoder=lud).eval()
                first = method.encoders[0]
                assert (method.fusion is not None) == dmif
                assert (method.prompt_generator is not None) == pg and hasattr(first, "prompt_encoder") == (not pg)
                assert (method.decoder is not None) == lud and hasattr(first, "mask_decoder") == (not lud)
                assert method.mask_tokens.num_embeddings == (4 if pg else 1)
                total = method.parameter_counts()["total"]
                assert total == (full - (0 if dmif else 12 * dmif_parameters(768, 4, 96) + FEEDBACK_GATES)
                                 - (0 if pg else PG + 3 * 256) + (0 if pg else PROMPT_ENCODER)
                                 - (0 if lud else lud_parameters((4, 8, 16))) + (0 if lud else MASK_DECODER))
                assert method(images, available).shape == (2, 2, 256, 256)
    brats = build_on_meta(head="brats", upsampling_decoder=False).eval()
    assert brats(images, available).shape == (2, 4, 256, 256)


def test_flops_per_slice_on_the_meta_device():
    """FlopCounterMode on a meta-device build: four ViT-B streams + DMIF's linear layers (exactly
    the arithmetic) + PG and LUD; the paper reports 311 GFLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from BrainLesionSAMLib.backbones.sam_vit import SamViTB

    with torch.device("meta"):
        stream = SamViTB(256)
        counter = FlopCounterMode(display=False)
        with counter:
            stream.encode(torch.zeros(1, 3, 256, 256))
    stream_flops = counter.get_total_flops()
    total = flops_per_slice(build_on_meta().eval())
    without_fusion = flops_per_slice(build_on_meta(dmif=False).eval())
    tokens, hidden = 16 * 16, 96
    per_token_macs = 3072 * hidden * 2 + 4 * (768 * hidden * 2) + 3072 * hidden + hidden * 768
    assert total - without_fusion == 12 * 2 * tokens * per_token_macs
    assert 4 * stream_flops < without_fusion < 4 * stream_flops + 3e9   # PG and LUD are light
    print(f"brainsegdmif: {total / 1e9:.1f} GFLOPs per slice (streams 4 x {stream_flops / 1e9:.1f}); paper 311")
    assert abs(total / 311e9 - 1) < 0.1


def test_dmif_softmax_missing_modalities_and_residual_mean():
    torch.manual_seed(0)
    fusion = DynamicModalInteractiveFusion(dim=8, num_modalities=4, hidden=6)
    features = torch.randn(3, 5, 5, 4, 8)
    present = torch.tensor([[True, True, True, True], [True, False, True, False], [False, False, False, True]])
    fused, weights = fusion(features, present)
    assert fused.shape == (3, 5, 5, 8) and weights.shape == (3, 5, 5, 4, 8)
    torch.testing.assert_close(weights.sum(dim=3), torch.ones(3, 5, 5, 8))
    assert torch.all(weights[1, :, :, [1, 3]] == 0) and torch.all(weights[2, :, :, :3] == 0)
    assert torch.all(weights[0] > 0)
    # What a missing modality's stream holds does not matter.
    changed = features.clone()
    changed[1, :, :, [1, 3]] = 100 * torch.randn(5, 5, 2, 8)
    changed[2, :, :, :3] = -7.0
    fused_changed, _ = fusion(changed, present)
    torch.testing.assert_close(fused_changed[1:], fused[1:])
    # With the interaction and the enhancement branch silenced, f_fus is the present streams' mean.
    with torch.no_grad():
        for layer in (fusion.interaction_out, fusion.enhance[2]):
            layer.weight.zero_()
            layer.bias.zero_()
    fused, _ = fusion(features, present)
    torch.testing.assert_close(fused[0], features[0].mean(dim=2))
    torch.testing.assert_close(fused[1], features[1, :, :, [0, 2]].mean(dim=2))
    torch.testing.assert_close(fused[2], features[2, :, :, 3])


def test_prompt_generator_and_decoder_shapes():
    torch.manual_seed(0)
    image, pe = torch.randn(2, 256, 4, 4), torch.randn(1, 256, 4, 4)
    tokens = torch.randn(2, 4, 256)
    prompts, enhanced = PromptGenerator()(image, pe, tokens)
    assert prompts.shape == (2, 4, 256) and enhanced.shape == (2, 256, 4, 4)
    decoder = LayerByLayerUpsamplingDecoder(num_masks=1, scale=16)
    assert decoder.strides == (4, 8, 16)
    assert [b[0].kernel_size for b in decoder.branches] == [(4, 4), (8, 8), (16, 16)]
    assert decoder(enhanced, pe, prompts, tokens).shape == (2, 1, 64, 64)
    lite = LayerByLayerUpsamplingDecoder(num_masks=4, scale=4)
    assert lite.strides == (1, 2, 4) and lite(enhanced, pe, prompts, tokens).shape == (2, 4, 16, 16)
    with pytest.raises(ValueError, match="multiple of 4"):
        LayerByLayerUpsamplingDecoder(num_masks=1, scale=6)


def test_forward_missing_modalities_and_case_weights(model):
    torch.manual_seed(1)
    images = 255 * torch.rand(2, 4, 256, 256)
    images[1, 0] = 0   # the engine zero-fills missing modalities
    available = torch.tensor([[True, True, True, True], [False, True, True, True]])
    model.start_case()
    assert model.case_weights() == {}
    with torch.no_grad():
        alone = model.predict_proba(images[1:], available[1:])   # the T1 stream is not computed at all
    assert model.case_weights()["modality weights"]["t1"] == 0.0
    model.start_case()
    with torch.no_grad():
        probabilities = model.predict_proba(images, available)   # T1 computed, masked for slice 2
    assert probabilities.shape == (2, 2, 256, 256) and torch.isfinite(probabilities).all()
    torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 256, 256))
    torch.testing.assert_close(probabilities[1:], alone, atol=1e-5, rtol=1e-4)
    weights = model.case_weights()["modality weights"]
    assert list(weights) == ["t1", "t1ce", "t2", "flair"]
    assert sum(weights.values()) == pytest.approx(1.0) and all(w > 0 for w in weights.values())
    assert weights["t1"] < min(weights["t1ce"], weights["t2"], weights["flair"])   # present in 1 of 2 slices
    with pytest.raises(MissingModalityError, match="at least one of"):
        model(images[:1], torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="available must be"):
        model(images, available[:, :3])


def test_state_dict_has_no_shared_tensors(model):
    """Our checkpoints are safetensors, which refuse tensors that share memory."""
    state = model.state_dict()
    pointers = [t.untyped_storage().data_ptr() for t in state.values()]
    assert len(set(pointers)) == len(pointers)
    assert "image_pe.positional_encoding_gaussian_matrix" in state
    assert not any(k.startswith("encoders.1.image_encoder.neck") for k in state)


def _parameters_without_gradient(model, images, target) -> list[str]:
    model.zero_grad()
    loss = model.loss(model(images, torch.ones(1, 4, dtype=torch.bool)), target)
    loss.backward()
    return [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]


def test_gradient_reaches_every_trainable_parameter(model):
    """With the default 'gated' feedback the gates start at 0, so at step 0 the fusions after blocks
    1-11 reach the loss only through their gates: the gates get a gradient, the fusions behind them
    none (the backbone is unchanged at the start, see test_brainsegdmif_starts_as_backbone). Once the
    first update has moved the gates off 0, the gradient reaches every trainable parameter."""
    torch.manual_seed(2)
    images = 255 * torch.rand(1, 4, 256, 256)
    target = torch.zeros(1, 256, 256, dtype=torch.long)
    target[:, 100:140, 90:150] = 1
    model.train()
    gated_fusions = {f"fusion.{i}." for i in range(11)}
    try:
        missing = _parameters_without_gradient(model, images, target)
        assert missing and {name[:name.index(".", 7) + 1] for name in missing} == gated_fusions
        assert all(model.feedback_gates[i].grad.abs().sum() > 0 for i in range(11))
        with torch.no_grad():
            for gate in model.feedback_gates:
                gate.fill_(1e-3)   # where the first Adam step (lr 1e-4) takes them: off 0
        assert _parameters_without_gradient(model, images, target) == []
    finally:
        with torch.no_grad():
            for gate in model.feedback_gates:
                gate.zero_()
        model.zero_grad(set_to_none=True)
        model.eval()


def test_one_adam_step_lowers_the_loss(lesion_batch):
    """The paper's optimiser (Adam, lr 1e-4) on everything; one shared encoder keeps the memory
    (weights, gradients, Adam's moments) at a quarter of the four-encoder network's."""
    images, available, target = lesion_batch
    assert images.shape == (2, 4, 256, 256) and target.any()
    torch.manual_seed(0)
    method = BrainSegDMIF(image_size=64, shared_encoder=True).train()
    optimiser = torch.optim.Adam(method.parameters(), lr=method.config["learning_rate"])
    loss_before = method.loss(method(images, available), target)
    optimiser.zero_grad()
    loss_before.backward()
    optimiser.step()
    with torch.no_grad():
        loss_after = method.loss(method(images, available), target)
    print(f"brainsegdmif one Adam step: loss {loss_before.item():.4f} -> {loss_after.item():.4f}")
    assert loss_after < loss_before


def test_focal_dice_loss_is_half_focal_plus_dice():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    target = torch.rand(2, 8, 8) > 0.6
    logits = torch.cat([torch.zeros_like(x), x], dim=1)
    p, t = torch.sigmoid(x)[:, 0], target.float()
    dice = 1 - (2 * (p * t).sum() + 1e-5) / (p.sum() + t.sum() + 1e-5)
    focal = (-(t * (1 - p) ** 2 * torch.log(p) + (1 - t) * p ** 2 * torch.log(1 - p))).mean()
    torch.testing.assert_close(FocalDiceLoss("sigmoid")(logits, target), dice + 0.5 * focal)
    # Four classes: softmax Dice over the three lesion classes + softmax focal over all four.
    logits = torch.randn(2, 4, 8, 8)
    classes = torch.randint(0, 4, (2, 8, 8))
    q = torch.softmax(logits, dim=1)
    onehot = torch.nn.functional.one_hot(classes, 4).permute(0, 3, 1, 2).float()
    dims = (0, 2, 3)
    dice = (1 - (2 * (q * onehot).sum(dims) + 1e-5) / (q.sum(dims) + onehot.sum(dims) + 1e-5))[1:].mean()
    focal = (-(onehot * (1 - q) ** 2 * torch.log(q))).mean()
    torch.testing.assert_close(FocalDiceLoss("softmax")(logits, classes), dice + 0.5 * focal)


def test_lite_backbone_fuses_at_every_tinyvit_width():
    """backbone 'lite': one DMIF per TinyViT block at that block's width (the first on a 256 x 256
    grid), every stream from the real lite_medsam.pth, and a forward pass with two modalities."""
    from BrainLesionSAMLib.backbones.litemedsam import load_lite_medsam_state

    torch.manual_seed(0)
    method = build_method("brainsegdmif", {"backbone": "lite", "modalities": ["t2", "flair"]}).eval()
    first = method.encoders[0]
    assert first.block_dims == (64, 128, 128, 160, 160, 160, 160, 160, 160, 320, 320, 320)
    assert [f.dim for f in method.fusion] == list(first.block_dims)
    assert [f.hidden for f in method.fusion] == [16] * 3 + [20] * 6 + [40] * 3
    assert method.decoder.strides == (1, 2, 4)
    published = load_lite_medsam_state()
    for encoder in method.encoders:
        state = encoder.image_encoder.state_dict()
        assert all(torch.equal(state[k.removeprefix("image_encoder.")], v) for k, v in published.items()
                   if k.startswith("image_encoder.") and k.removeprefix("image_encoder.") in state)
    streams = 2 * LITE_ENCODER - LITE_NECK
    fusion = sum(dmif_parameters(d, 2, max(d // 8, 16)) for d in first.block_dims) + sum(first.block_dims[:-1])
    assert method.parameter_counts()["total"] == streams + fusion + 4 * 256 + PG + lud_parameters((1, 2, 4))
    images = 255 * torch.rand(1, 4, 256, 256)
    method.start_case()
    with torch.no_grad():
        logits = method(images, torch.tensor([[True, True, True, True]]))
    assert logits.shape == (1, 2, 256, 256) and torch.isfinite(logits).all()
    assert set(method.case_weights()["modality weights"]) == {"t2", "flair"}


def _last_streams(method: BrainSegDMIF, images, available) -> dict:
    """Run the method once and return its streams' tokens after the last encoder block."""
    captured = {}
    run_block, last = method._run_block, method.backbone.num_blocks - 1

    def recording(index, streams):
        out = run_block(index, streams)
        if index == last:
            captured.update(out)
        return out

    method._run_block = recording
    try:
        with torch.no_grad():
            method(images, available)
    finally:
        del method._run_block
    return captured


def test_brainsegdmif_starts_as_backbone(lesion_batch):
    """Where it applies, the encoder: with the default fusion feedback ('gated', gates 0 at the start)
    every modality's stream is at initialisation its pretrained backbone's own encoder on that
    modality (LiteMedSAM's real weights, a separately built copy, TinyViT's own forward): the neck of
    the last block's stream equals the copy's embedding, within float tolerance. (The fused f_fus and
    the new decoder are BrainSegDMIF's additions and do not start as SAM.) The literal 'add' does not."""
    from BrainLesionSAMLib.backbones.litemedsam import build_lite_medsam

    images, available, _ = lesion_batch
    reference = build_lite_medsam()
    for feedback, starts_as_backbone in (("gated", True), ("add", False)):
        torch.manual_seed(0)
        method = build_method("brainsegdmif", {"backbone": "lite", "modalities": ["t1ce", "flair"],
                                               "fusion_feedback": feedback}).eval()
        assert method.config["fusion_feedback"] == feedback
        streams = _last_streams(method, images[:1], available[:1])
        assert sorted(streams) == [0, 1]
        for j, channel in enumerate((1, 3)):   # t1ce, flair
            with torch.no_grad():
                expected = reference.image_encoder(reference.normalize(images[:1, channel:channel + 1].expand(-1, 3, -1, -1)))
                got = reference.image_encoder.neck(streams[j].permute(0, 3, 1, 2))
            close = torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
            assert close == starts_as_backbone, (feedback, j, (got - expected).abs().max())
    assert BrainSegDMIF.default_config["fusion_feedback"] == "gated"
