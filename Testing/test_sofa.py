"""SOFA on CPU with the real LiteMedSAM weights: attention (eq. 1-3), the two passes (eq. 4-6), the
combination into one label map, the embedding cache and case weights, training (one step lowers the
loss), augmentation. Most tests work on a module-wide set of embeddings so that TinyViT runs little."""
import copy

import numpy as np
import pytest
import torch

from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.methods import MethodFacts
from BrainLesionSAMLib.methods.sofa import (REGIONS, SOFA, SubRegionModalityAttention, build_augmentation,
                                            mask_bounding_boxes, region_class_probabilities)
from BrainLesionSAMLib.preprocessing import prepare_case
from conftest import blob_case

# LiteMedSAM's parts (test_litemedsam.py / METHODS.md) and SAM ViT-B at 256; 3 x Linear(256 -> 1).
LITE_ENCODER, PROMPT_ENCODER, MASK_DECODER, SAM_VIT_B_256 = 5_726_740, 6_220, 4_058_340, 90_737_200
ATTENTION = 3 * (256 + 1)
REGION_PROMPTS = 3 * 256
S = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SOFA().eval()


@pytest.fixture(scope="module")
def blob():
    """A small synthetic case (all four modalities), its prepared form and labels."""
    images, labels = blob_case((9, 40, 48))
    import SimpleITK as sitk
    return images, prepare_case(images), sitk.GetArrayFromImage(labels)


@pytest.fixture(scope="module")
def lesion_embeddings(model, blob):
    """Modality embeddings of the two slices with most lesion (T1CE and FLAIR given: four TinyViT
    runs), with their class targets."""
    _, case, labels = blob
    z = [int(i) for i in np.argsort((labels > 0).sum(axis=(1, 2)))[-2:]]
    available = torch.tensor([[False, True, False, True]]).expand(len(z), -1).clone()
    images = case.network_slices(z) * available[:, :, None, None]
    classes = np.select([labels[z] == 1, labels[z] == 2, labels[z] == 4], [1, 2, 3], 0)
    target = case.slice_geometry.to_network(classes, nearest=True).long()
    with torch.no_grad():
        embeddings = model.encode(images, available)
    return embeddings, available, target


def test_facts_and_config():
    facts: MethodFacts = SOFA.facts
    assert facts.name == "sofa" and facts.label_set == "brats" and facts.labels == (0, 1, 2, 4)
    assert facts.modalities == MODALITIES and facts.tolerates_missing and facts.spatial_dims == 2
    assert facts.promptable and facts.cacheable_embeddings and facts.input_size == (256, 256)
    config = SOFA.default_config
    assert (config["backbone"], config["backbone_weights"], config["refine"]) == ("lite", None, True)
    assert (config["optimizer"], config["learning_rate"], config["scheduler"]) == ("adam", 3e-5, "cosine")
    assert (config["batch_size"], config["epochs"], config["lambda_ce"], config["lambda_iou"]) == (2, 200, 1.0, 1.0)
    assert SOFA.initialisation_keys == ("backbone_weights",)
    for bad, message in [({"attention": 1}, "unknown config"),
                         ({"attention_pooling": "max"}, "attention_pooling"),
                         ({"first_pass_prompt": "brain"}, "first_pass_prompt"),
                         ({"refine": "yes"}, "refine"),
                         ({"region_prompts": 1}, "region_prompts"),
                         ({"lambda_iou": -1}, "lambda_iou"),
                         ({"train_box_jitter_px": 2.5}, "train_box_jitter_px"),
                         ({"train_user_box_probability": 2}, "train_user_box_probability"),
                         ({"backbone": "vit_h"}, "unknown backbone"),
                         ({"image_size": 1024}, "smaller multiple of 64")]:
        with pytest.raises(ValueError, match=message):
            with torch.device("meta"):
                SOFA(**bad)
    assert SOFA.pretrained() is None


def test_parameter_counts_weights_and_frozen_encoder(model):
    from BrainLesionSAMLib.backbones.litemedsam import load_lite_medsam_state
    from BrainLesionSAMLib.cli import parameter_counts

    lite = LITE_ENCODER + PROMPT_ENCODER + MASK_DECODER
    ours = ATTENTION + REGION_PROMPTS
    assert model.parameter_counts() == {"total": lite + ours, "trainable": lite + ours} == \
        {"total": 9_792_839, "trainable": 9_792_839}
    assert abs(lite / 9.8e6 - 1) < 0.01  # "LiteMedSAM alone is 9.8M"
    # Meta-device counts (what `brainlesionsam info` reports), both backbones.
    assert parameter_counts("sofa") == model.parameter_counts()
    assert parameter_counts("sofa", {"backbone": "vit_b"})["total"] == SAM_VIT_B_256 + ours
    assert parameter_counts("sofa", {"region_prompts": False})["total"] == lite + ATTENTION
    published = load_lite_medsam_state()
    state = model.backbone.state_dict()
    assert published.keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in published.items())
    assert model.attention.score.weight.abs().sum() == 0  # zero init: mean fusion at the start
    assert model.region_prompts.abs().sum() == 0          # and no sub-region prompt yet

    # (TinyViT cannot be built on the meta device - its constructor reads tensor values - so the
    # counts above come from the fallback real build; these are real builds too.)
    frozen = SOFA(freeze_image_encoder=True).train()
    assert not frozen.backbone.image_encoder.training and frozen.backbone.mask_decoder.training
    assert all(not p.requires_grad for p in frozen.backbone.image_encoder.parameters())
    assert frozen.parameter_counts()["trainable"] == PROMPT_ENCODER + MASK_DECODER + ours
    trained = copy.deepcopy(model).train()
    assert trained.backbone.image_encoder.training


def explicit_attention(attention, features, available):
    """Eq. 1-3 written out modality by modality and pixel by pixel (the reference for the module)."""
    batch, modalities, channels, height, width = features.shape
    weight, bias = attention.score.weight, attention.score.bias
    regions = weight.shape[0]
    alpha = torch.zeros(batch, regions, modalities, height, width)
    fused = torch.zeros(batch, regions, channels, height, width)
    for b in range(batch):
        for r in range(regions):
            for y in range(height):
                for x in range(width):
                    present = [m for m in range(modalities) if available[b, m]]
                    if attention.pooling == "mean":
                        vectors = {m: features[b, m].mean(dim=(1, 2)) for m in present}
                    else:
                        vectors = {m: features[b, m, :, y, x] for m in present}
                    e = {m: torch.tanh(weight[r] @ vectors[m] + bias[r]) for m in present}   # eq. 1
                    total = sum(torch.exp(v) for v in e.values())
                    for m in present:
                        alpha[b, r, m, y, x] = torch.exp(e[m]) / total                      # eq. 2
                        fused[b, r, :, y, x] += alpha[b, r, m, y, x] * features[b, m, :, y, x]  # eq. 3
    return alpha, fused


@pytest.mark.parametrize("pooling", ["none", "mean"])
def test_attention_is_eq_1_to_3_and_weights_sum_to_one(pooling):
    torch.manual_seed(0)
    attention = SubRegionModalityAttention(embed_dim=8, num_regions=3, pooling=pooling, zero_init=False)
    with torch.no_grad():
        attention.score.weight.mul_(5)
    features = torch.randn(3, 4, 8, 3, 2)
    available = torch.tensor([[True, True, True, True], [False, True, False, True], [False, False, True, False]])
    with torch.no_grad():
        fused, alpha = attention(features, available)
        expected_alpha, expected_fused = explicit_attention(attention, features, available)
    size = (3, 2) if pooling == "none" else (1, 1)
    assert alpha.shape == (3, 3, 4) + size and fused.shape == (3, 3, 8, 3, 2)
    torch.testing.assert_close(alpha.sum(dim=2), torch.ones(3, 3, *size))          # sums to 1 over modalities
    assert torch.all(alpha[1, :, [0, 2]] == 0) and torch.all(alpha[2, :, 2] == 1)   # missing ones excluded
    torch.testing.assert_close(alpha.expand(-1, -1, -1, 3, 2), expected_alpha)
    torch.testing.assert_close(fused, expected_fused)
    # Different sub-regions weigh the modalities differently (W_r differ).
    assert not torch.allclose(alpha[0, 0], alpha[0, 1])
    with pytest.raises(ValueError, match="at least one available modality"):
        attention(features, torch.zeros(3, 4, dtype=torch.bool))


def test_zero_initialised_attention_is_the_mean_of_the_available_modalities():
    attention = SubRegionModalityAttention(embed_dim=8)
    features = torch.randn(1, 4, 8, 2, 2)
    available = torch.tensor([[True, False, True, True]])
    fused, alpha = attention(features, available)
    torch.testing.assert_close(alpha[0, :, [0, 2, 3]], torch.full((3, 3, 2, 2), 1 / 3))
    torch.testing.assert_close(fused[0, 1], features[0, [0, 2, 3]].mean(dim=0))


def test_mask_bounding_boxes():
    masks = torch.zeros(3, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 0] = True
    masks[1, 9, 11] = True
    boxes = mask_bounding_boxes(masks)
    assert boxes.tolist() == [[3, 2, 9, 5], [0, 7, 12, 10], [0, 0, 0, 0]]  # exclusive end; empty -> zeros
    assert mask_bounding_boxes(masks[None]).shape == (1, 3, 4)


def test_region_probabilities_follow_the_threshold_rule():
    torch.manual_seed(0)
    logits = 4 * torch.randn(2, 3, 16, 16)
    logits[0, :, 0, 0] = torch.tensor([2.0, 3.0, -1.0])   # overlap: ED (most probable) wins
    logits[0, :, 0, 1] = torch.tensor([-0.1, -2.0, -0.5])  # nothing above 0.5: background
    logits[0, :, 0, 2] = torch.tensor([0.0, -1.0, -1.0])   # exactly 0.5: background
    probabilities = region_class_probabilities(logits)
    assert probabilities.shape == (2, 4, 16, 16)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2, 16, 16))
    p = torch.sigmoid(logits)
    top, winner = p.max(dim=1)
    expected = torch.where(top > 0.5, winner + 1, torch.zeros_like(winner))
    assert torch.equal(probabilities.argmax(dim=1), expected)
    assert probabilities.argmax(dim=1)[0, 0, :3].tolist() == [2, 0, 0]
    torch.testing.assert_close(probabilities[:, 0], 1 - top)
    torch.testing.assert_close(probabilities[:, 1:].max(dim=1).values, top)


class ScriptedDecoder:
    """Stands in for SOFA._decode: records its calls, answers pass 1 with given logits and pass 2
    with given logits for the decoded sub-regions."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor):
        self.first, self.second, self.calls = first, second, []

    def __call__(self, embeddings, boxes):
        self.calls.append((embeddings.shape[0], None if boxes is None else boxes.clone()))
        self.embeddings = getattr(self, "embeddings", []) + [embeddings.detach().clone()]
        return self.first.flatten(0, 1) if len(self.calls) == 1 else self.second[: embeddings.shape[0]]


def test_two_pass_logic_with_a_scripted_decoder(model, monkeypatch):
    """Pass 2 decodes exactly the sub-regions pass 1 found, with their bounding boxes (eq. 4); an
    absent sub-region keeps its pass-1 logits; a user box replaces the automatic pass-1 box."""
    first = torch.full((2, 3, S, S), -5.0)
    first[0, 0, 10:20, 30:60] = 3.0     # image 0: NCR and ET found, ED absent
    first[0, 2, 100:101, 5:6] = 1.0
    first[1, 1, 50:200, 40:45] = 2.0    # image 1: ED only
    second = torch.randn(3, S, S)
    embeddings = torch.randn(2, 4, 256, 2, 2)
    available = torch.ones(2, 4, dtype=torch.bool)
    decoder = ScriptedDecoder(first, second)
    monkeypatch.setattr(model, "_decode", decoder)
    result = model.two_pass(embeddings, available)

    (n1, boxes1), (n2, boxes2) = decoder.calls
    assert n1 == 6 and boxes1.tolist() == [[0, 0, S, S]] * 6           # automatic: the whole slice
    assert result.present.tolist() == [[True, False, True], [False, True, False]]
    assert torch.equal(result.second_boxes, mask_bounding_boxes(first > 0))
    assert n2 == 3 and boxes2.tolist() == [[30, 10, 60, 20], [5, 100, 6, 101], [40, 50, 45, 200]]
    assert torch.equal(result.logits[0, 0], second[0]) and torch.equal(result.logits[0, 2], second[1])
    assert torch.equal(result.logits[1, 1], second[2])
    assert torch.equal(result.logits[0, 1], first[0, 1]) and torch.equal(result.logits[1, 0], first[1, 0])
    assert torch.equal(result.first_logits, first)

    user = torch.tensor([[10.0, 20.0, 100.0, 120.0], [0.0, 5.0, 50.0, 60.0]])
    decoder = ScriptedDecoder(first, second)
    monkeypatch.setattr(model, "_decode", decoder)
    result = model.two_pass(embeddings, available, user)
    assert torch.equal(decoder.calls[0][1], user.repeat_interleave(3, 0))
    assert torch.equal(result.first_boxes, user)

    monkeypatch.setitem(model.config, "first_pass_prompt", "none")
    monkeypatch.setitem(model.config, "refine", False)
    decoder = ScriptedDecoder(first, second)
    monkeypatch.setattr(model, "_decode", decoder)
    result = model.two_pass(embeddings, available)
    assert len(decoder.calls) == 1 and decoder.calls[0][1] is None and result.second_boxes is None
    assert torch.equal(result.logits, first)


def test_region_prompts_tell_the_decoder_which_sub_region(model, monkeypatch):
    """What the decoder gets for sub-region r is f_r + t_r (t_r: r's learnt dense prompt); without
    region prompts and with equal attention weights the three sub-regions get identical inputs."""
    torch.manual_seed(0)
    embeddings = torch.randn(1, 4, 256, 2, 2)
    available = torch.tensor([[True, False, True, True]])
    mean = embeddings[0, [0, 2, 3]].mean(dim=0)
    first = torch.full((1, 3, S, S), -5.0)
    with_prompts = copy.deepcopy(model)
    with torch.no_grad():
        with_prompts.region_prompts.copy_(torch.randn(3, 256))
    for method, prompts in ((with_prompts, with_prompts.region_prompts.detach()),
                            (model, torch.zeros(3, 256))):
        decoder = ScriptedDecoder(first, first[0])
        monkeypatch.setattr(method, "_decode", decoder)
        method.two_pass(embeddings, available)
        given = decoder.embeddings[0]
        for r in range(3):
            torch.testing.assert_close(given[r], mean + prompts[r][:, None, None])
    without = copy.deepcopy(model)
    without.region_prompts = None
    without.config = {**model.config, "region_prompts": False}
    decoder = ScriptedDecoder(first, first[0])
    monkeypatch.setattr(without, "_decode", decoder)
    without.two_pass(embeddings, available)
    assert torch.equal(decoder.embeddings[0][0], decoder.embeddings[0][1])


def test_two_passes_on_the_real_network_and_refinement_switch(model, lesion_embeddings):
    embeddings, available, _ = lesion_embeddings
    assert embeddings.shape == (2, 4, 256, 64, 64)
    assert embeddings[:, [0, 2]].abs().sum() == 0 and embeddings[:, [1, 3]].abs().sum() > 0
    torch.manual_seed(3)
    on = copy.deepcopy(model)
    with torch.no_grad():
        on.attention.score.weight.normal_(0, 0.5)  # sub-regions fuse differently
        result = on.two_pass(embeddings, available)
    assert result.present.any(), "pass 1 found nothing on the lesion slices"
    masks = result.first_logits > 0
    assert torch.equal(result.second_boxes, mask_bounding_boxes(masks))
    for b, r in result.present.nonzero().tolist():
        ys, xs = torch.nonzero(masks[b, r], as_tuple=True)
        assert result.second_boxes[b, r].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert not torch.equal(result.logits[b, r], result.first_logits[b, r])  # pass 2 ran
    for b, r in (~result.present).nonzero().tolist():
        assert torch.equal(result.logits[b, r], result.first_logits[b, r])
    off = copy.deepcopy(on)
    off.config = {**on.config, "refine": False}
    with torch.no_grad():
        probabilities_off = off.decode_proba(embeddings, available)
    assert torch.equal(probabilities_off, region_class_probabilities(result.first_logits))
    assert not torch.equal(probabilities_off, region_class_probabilities(result.logits))


def test_bad_inputs_are_refused_before_encoding(model):
    images = torch.zeros(1, 4, 256, 256)
    with pytest.raises(ValueError, match=r"images \[B, 4, 256, 256\]"):
        model.predict_proba(torch.zeros(1, 3, 256, 256), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one available modality"):
        model.predict_proba(images, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"boxes must be \[B, 4\]"):
        model.predict_proba(images, torch.ones(1, 4, dtype=torch.bool), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="finite"):
        model.predict_proba(images, torch.ones(1, 4, dtype=torch.bool), torch.tensor([[0, 0, float("inf"), 9]]))


def test_engine_cached_and_uncached_agree_with_case_weights(blob):
    """Through the engine on two modalities (T1CE, FLAIR; the others are never encoded): the cached
    path (encode + decode_proba) equals predict_proba, a second box encodes nothing, and the case
    weights name each found sub-region's modality weights (summing to 1)."""
    from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine

    images, _, labels = blob
    case = prepare_case({m: images[m] for m in ("t1ce", "flair")})
    z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    torch.manual_seed(1)
    method = SOFA()
    with torch.no_grad():
        method.attention.score.weight.normal_(0, 0.5)
    encoded = []
    original = method.modality_embeddings

    def counting(images, available):
        encoded.append(int(available.sum()))
        return original(images, available)

    method.modality_embeddings = counting
    box = Box(2, 2, z, 45, 37, z)
    plain = InferenceEngine(method, device="cpu").segment(box=box, case=case, return_probabilities=True)
    cache = EmbeddingCache()
    cached_engine = InferenceEngine(method, device="cpu", embedding_cache=cache)
    cached = cached_engine.segment(case, box=box, return_probabilities=True)
    assert encoded == [2, 2] and len(cache) == 1
    import SimpleITK as sitk
    assert np.array_equal(sitk.GetArrayFromImage(plain.labels), sitk.GetArrayFromImage(cached.labels))
    assert np.array_equal(sitk.GetArrayFromImage(plain.probabilities), sitk.GetArrayFromImage(cached.probabilities))
    assert plain.case_weights == cached.case_weights and plain.case_weights
    for region, weights in plain.case_weights.items():
        assert region in REGIONS and set(weights) == {"t1ce", "flair"}
        assert abs(sum(weights.values()) - 1) < 1e-6
    assert len({round(w["flair"], 6) for w in plain.case_weights.values()}) > 1  # sub-regions differ
    cached_engine.segment(case, box=Box(5, 5, z, 40, 30, z))
    assert encoded == [2, 2]  # the new box re-ran only attention + decoder
    method.start_case()
    assert method.case_weights() == {}


def test_forward_is_the_log_of_predict_proba(model, lesion_embeddings, monkeypatch):
    embeddings, available = lesion_embeddings[0][:1], lesion_embeddings[1][:1]
    monkeypatch.setattr(model, "encode", lambda images, available: embeddings)
    images = torch.zeros(1, 4, 256, 256)
    with torch.no_grad():
        logits = model(images, available)
        probabilities = model.predict_proba(images, available)
    assert logits.shape == (1, 4, 256, 256)
    torch.testing.assert_close(torch.softmax(logits, dim=1), probabilities)


def test_region_loss_is_bce_plus_soft_iou(model):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8)
    target = torch.rand(2, 8, 8) > 0.6
    p, t = torch.sigmoid(x), target.float()
    intersection = (p * t).sum()
    iou = 1 - (2 * intersection + 1e-5) / (2 * (p.sum() + t.sum() - intersection) + 1e-5)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, t)
    torch.testing.assert_close(model.region_loss(x, target), bce + iou)
    # loss() on forward's class logits: the same per sub-region, summed.
    logits = torch.log(region_class_probabilities(torch.randn(2, 3, 8, 8)))
    classes = torch.randint(0, 4, (2, 8, 8))
    assert torch.isfinite(model.loss(logits, classes))


def test_balanced_region_loss_weighs_lesion_and_background_pixels_equally():
    """ce_positive_weight 'balanced': per sample, the mean BCE over the mask's pixels and over the
    others, averaged (an empty mask: the others only); checked against a per-pixel loop. A one-pixel
    lesion then pulls its logit up about 30,000 times harder than the plain mean does."""
    import math

    balanced = SOFA(freeze_image_encoder=True, ce_positive_weight="balanced")
    x = torch.randn(2, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.bool)
    target[0, 3, 4] = True                                  # sample 0: one lesion pixel; sample 1: none
    p, t = torch.sigmoid(x), target.float()
    intersection = (p * t).sum()
    iou = 1 - (2 * intersection + 1e-5) / (2 * (p.sum() + t.sum() - intersection) + 1e-5)
    bce = [[-math.log(float(p[n, i, j])) if target[n, i, j] else -math.log(1 - float(p[n, i, j]))
            for i in range(16) for j in range(16)] for n in range(2)]
    first = 0.5 * (bce[0][3 * 16 + 4] + (sum(bce[0]) - bce[0][3 * 16 + 4]) / 255)
    second = sum(bce[1]) / 256
    expected = (first + second) / 2 + float(iou)
    assert float(balanced.region_loss(x, target)) == pytest.approx(expected, rel=1e-5)

    plain = SOFA(freeze_image_encoder=True)
    gradients = []
    for method in (plain, balanced):
        logits = torch.full((1, 256, 256), -8.0, requires_grad=True)  # collapsed: nothing predicted
        one = torch.zeros(1, 256, 256, dtype=torch.bool)
        one[0, 100, 100] = True
        method.region_loss(logits, one).backward()
        gradients.append(-float(logits.grad[0, 100, 100]))
    assert gradients[1] > 1000 * gradients[0] > 0
    # a number w: BCE with pos_weight w (torch's), the mean over pixels
    weighted = SOFA(freeze_image_encoder=True, ce_positive_weight=20)
    expected = (sum(20 * b if target.flatten()[n * 256 + k] else b for n in range(2) for k, b in enumerate(bce[n]))
                / 512 + float(iou))
    assert float(weighted.region_loss(x, target)) == pytest.approx(expected, rel=1e-5)
    for bad in (0.5, True, "more"):
        with pytest.raises(ValueError, match="ce_positive_weight"):
            SOFA(ce_positive_weight=bad)


def test_one_adam_step_lowers_the_loss(model, lesion_embeddings):
    """One-vs-all loss of both passes on fixed embeddings (frozen encoder), same draws before and after."""
    embeddings, available, target = lesion_embeddings
    assert target.shape == (2, 256, 256) and set(target.unique().tolist()) >= {0, 1, 2, 3}
    torch.manual_seed(0)
    trained = copy.deepcopy(model).train()
    regions = torch.tensor([0, 2])  # NCR on one slice, ET on the other
    boxes = torch.tensor([[60.0, 60.0, 200.0, 200.0]] * 2)

    def loss():
        return trained.embedding_loss(embeddings, available, target, boxes, regions,
                                      generator=torch.Generator().manual_seed(0))

    optimiser = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=1e-4)
    before = loss()
    optimiser.zero_grad()
    before.backward()
    assert trained.attention.score.weight.grad.abs().sum() > 0
    assert trained.backbone.mask_decoder.output_upscaling[0].weight.grad is not None
    optimiser.step()
    with torch.no_grad():
        after = loss()
    print(f"sofa one Adam step: loss {before.item():.4f} -> {after.item():.4f}")
    assert after < before


def test_training_loss_reaches_the_encoder_and_another_backbone(blob):
    """The training contract's path, images -> encoder (trainable by default) -> one-vs-all loss, on
    SAM ViT-B (random) at 64 x 64 encoder input: slices resized inside, boxes scaled, masks back at
    256 (cheap: 4 x 4 tokens)."""
    _, case, labels = blob
    z = int(np.argmax((labels > 0).sum(axis=(1, 2))))
    classes = np.select([labels[z] == 1, labels[z] == 2, labels[z] == 4], [1, 2, 3], 0)
    available = torch.tensor([[False, False, False, True]])   # FLAIR only: one encode
    batch = {"images": case.network_slices([z]) * available[0, :, None, None],
             "available": available,
             "target": case.slice_geometry.to_network(classes[None], nearest=True).long(),
             "boxes": torch.tensor([[80.0, 80.0, 180.0, 180.0]])}
    torch.manual_seed(0)
    method = SOFA(backbone="vit_b", image_size=64).train()
    loss = method.training_loss(batch, progress=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in method.backbone.image_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert method.attention.score.weight.grad is not None
    method.eval()
    with torch.no_grad():
        embeddings = method.encode(batch["images"], available)
        probabilities = method.decode_proba(embeddings, available, batch["boxes"])
    assert embeddings.shape == (1, 4, 256, 4, 4) and embeddings[0, :3].abs().sum() == 0
    assert probabilities.shape == (1, 4, 256, 256)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(1, 256, 256))


def test_augmentation_definition():
    from monai.transforms import RandRotated, RandScaleIntensityd, RandShiftIntensityd, RandZoomd

    transform = build_augmentation()
    kinds = [type(t) for t in transform.transforms]
    assert kinds == [RandRotated, RandZoomd, RandScaleIntensityd, RandShiftIntensityd]
    rotate, zoom = transform.transforms[0], transform.transforms[1]
    assert rotate.rand_rotate.range_x == pytest.approx((-np.pi / 12, np.pi / 12))
    assert (zoom.rand_zoom.min_zoom, zoom.rand_zoom.max_zoom) == ((0.9,), (1.1,))
    image = torch.zeros(4, 64, 64)
    image[:, 16:48, 16:48] = 100.0
    label = torch.zeros(1, 64, 64)
    label[:, 20:40, 20:40] = 2
    label[:, 25:30, 25:30] = 3
    changed = False
    for seed in range(8):
        transform.set_random_state(seed=seed)
        out = transform({"image": image.clone(), "label": label.clone(), "brain": (image[:1] > 0).float()})
        assert out["image"].shape == (4, 64, 64) and out["label"].shape == (1, 64, 64)
        assert set(torch.as_tensor(out["label"]).unique().tolist()) <= {0.0, 2.0, 3.0}  # nearest: no new labels
        changed |= not torch.equal(torch.as_tensor(out["label"]), label)
    assert changed
    with pytest.raises(ValueError, match="probability"):
        build_augmentation(probability=1.5)


def test_no_packaged_or_third_party_weights():
    from BrainLesionSAMLib.checkpoints import load_method
    from BrainLesionSAMLib.errors import WeightsError

    with pytest.raises(WeightsError, match="ships no weights"):
        load_method("sofa")
    with pytest.raises(WeightsError, match="does not read third-party"):
        load_method("sofa", "lite_medsam.pth")


def test_checkpoint_round_trip(model, tmp_path):
    """Our safetensors checkpoint holds every tensor (TinyViT's 0-dim BatchNorm counters included);
    loading it needs no lite_medsam.pth path (initialisation key)."""
    from BrainLesionSAMLib.checkpoints import load_method, save_checkpoint

    trained = copy.deepcopy(model)
    with torch.no_grad():
        trained.attention.score.weight.fill_(0.25)
    path = save_checkpoint(trained, tmp_path / "sofa.safetensors")
    loaded = load_method("sofa", path)
    assert loaded.config["backbone_weights"] is None
    assert torch.equal(loaded.attention.score.weight, trained.attention.score.weight)
    assert torch.equal(loaded.backbone.mask_decoder.output_upscaling[0].weight,
                       trained.backbone.mask_decoder.output_upscaling[0].weight)


def test_sofa_starts_as_backbone(lesion_batch):
    """At initialisation SOFA is LiteMedSAM (the real weights) with nothing added: on one modality
    (FLAIR) each sub-region's pass 1 is LiteMedSAM's own output for the whole-slice box, and pass 2
    its output for the box around that mask (LiteMedSAM's box refinement); with all four modalities,
    pass 1 decodes the mean of LiteMedSAM's four embeddings (alpha = 1/4, zero sub-region prompts).
    The reference is the backbone's own forward / encoder forward, within float tolerance."""
    images, available, _ = lesion_batch
    torch.manual_seed(0)
    model = SOFA().eval()
    backbone = model.backbone
    flair_only = torch.tensor([[False, False, False, True]])
    whole = torch.tensor([[0.0, 0.0, 256.0, 256.0]])
    with torch.no_grad():
        result = model.two_pass(model.encode(images[:1], flair_only), flair_only)
        first = backbone(images[:1, 3:4].expand(-1, 3, -1, -1), whole)[:, 0]
        ys, xs = np.nonzero(first[0].numpy() > 0)
        box = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
        second = backbone(images[:1, 3:4].expand(-1, 3, -1, -1), box)[:, 0]
        for r in range(3):
            torch.testing.assert_close(result.first_logits[:, r], first, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(result.logits[:, r], second, atol=1e-4, rtol=1e-4)
        assert result.present.all() and not torch.allclose(first, second, atol=1e-2)
        everything = torch.ones(1, 4, dtype=torch.bool)
        grey = images[0, :, None].expand(-1, 3, -1, -1)                    # the four modalities as images
        mean = backbone.image_encoder(backbone.normalize(grey)).mean(dim=0, keepdim=True)
        fused = model.two_pass(model.encode(images[:1], everything), everything)
        torch.testing.assert_close(fused.first_logits[:, 0], backbone.decode(mean, whole)[:, 0], atol=1e-4, rtol=1e-4)
