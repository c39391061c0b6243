"""DB-SAM on CPU: the deformable attention against a naive loop, shapes at 256 (real) and 1024 (on the
meta device: a real 1024 ViT-B encode takes ~14 s per slice on a CPU), the parameter counts from
the architecture's formulas, cached = uncached, training boxes, what is frozen, one AdamW step
with each backbone. Logic tests use a reduced config (SMALL: MLP ratio 0.5 instead of 4, bilateral
cross-attention after blocks 5 and 11 instead of 2, 5, 8, 11) to stay fast on a shared CPU: the
default architecture is checked by the parameter counts and the meta-device forward."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine
from BrainLesionSAMLib.errors import BrainLesionSAMError, MissingModalityError
from BrainLesionSAMLib.methods.boxprompt import BoxRequiredError
from BrainLesionSAMLib.methods.dbsam import DBSAM, boxes_from_masks
from BrainLesionSAMLib.methods.deformable_attention import (MultiScaleDeformableAttention, grid_reference_points,
                                                             multi_scale_deformable_sampling)
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case

ENCODER_256, ENCODER_1024, PROMPT_ENCODER, MASK_DECODER = 86_672_640, 89_670_912, 6_220, 4_058_340
LITE_ENCODER = 5_726_740
SAM_VIT_B = 93_735_472
SMALL = {"mlp_ratio": 0.5, "interaction_blocks": [5, 11]}


# ------------------------------------------------------------------------------ deformable attention

def bilinear_zero_padded(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """image [C, H, W] at normalised (x, y) in [0, 1] (pixel centres at (j + 0.5) / W), zeros outside."""
    channels, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(channels, dtype=image.dtype)
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                out += wy * wx * image[:, yy, xx]
    return out


def naive_sampling(values, locations, weights):
    """Loop over sample, query, head, level, point: the definition of the sampling core."""
    batch, queries, heads, levels, points, _ = locations.shape
    head_dim = values[0].shape[2]
    out = torch.zeros(batch, queries, heads * head_dim, dtype=values[0].dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                acc = torch.zeros(head_dim, dtype=values[0].dtype)
                for level in range(levels):
                    for p in range(points):
                        x, y = locations[b, q, h, level, p].tolist()
                        acc += weights[b, q, h, level, p] * bilinear_zero_padded(values[level][b, h], x, y)
                out[b, q, h * head_dim:(h + 1) * head_dim] = acc
    return out


def test_deformable_sampling_equals_a_naive_loop():
    torch.manual_seed(0)
    batch, queries, heads, points, head_dim = 2, 5, 3, 4, 6
    shapes = [(7, 5), (3, 4)]
    values = [torch.randn(batch, heads, head_dim, h, w) for h, w in shapes]
    # locations partly outside [0, 1]: the zero padding is part of the definition
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points).flatten(-2).softmax(-1).view(
        batch, queries, heads, len(shapes), points)
    fast = multi_scale_deformable_sampling(values, locations, weights)
    slow = naive_sampling(values, locations, weights)
    assert fast.shape == (batch, queries, heads * head_dim)
    assert (fast - slow).abs().max() < 1e-5
    # a location on a pixel centre reads that pixel
    centre = torch.tensor([(2 + 0.5) / 5, (4 + 0.5) / 7])
    one = torch.ones(1, 1, 1, 1, 1)
    at_centre = multi_scale_deformable_sampling([values[0][:1, :1]], centre.view(1, 1, 1, 1, 1, 2), one)
    torch.testing.assert_close(at_centre[0, 0], values[0][0, 0, :, 4, 2])


def test_deformable_attention_module_equals_a_naive_loop():
    """The module = projections + offsets / (W, H) + softmax over levels and points + the naive core;
    the value width may differ from the query width."""
    torch.manual_seed(1)
    dim, value_dim, heads, levels, points = 8, 12, 2, 2, 3
    module = MultiScaleDeformableAttention(dim, heads, levels, points, value_dim=value_dim)
    for parameter in module.parameters():  # away from the structured initialisation
        torch.nn.init.normal_(parameter, std=0.5)
    shapes = [(4, 6), (3, 2)]
    query = torch.randn(2, 4 * 3, dim)
    reference = grid_reference_points(4, 3)[None]
    values = [torch.randn(2, h, w, value_dim) for h, w in shapes]
    with torch.no_grad():
        out = module(query, reference, values)
        offsets = module.sampling_offsets(query).view(2, 12, heads, levels, points, 2)
        logits = module.attention_weights(query).view(2, 12, heads, levels * points)
        weights = logits.softmax(-1).view(2, 12, heads, levels, points)
        locations = torch.empty_like(offsets)
        for level, (h, w) in enumerate(shapes):
            locations[:, :, :, level, :, 0] = reference[0, None, :, None, None, 0] + offsets[:, :, :, level, :, 0] / w
            locations[:, :, :, level, :, 1] = reference[0, None, :, None, None, 1] + offsets[:, :, :, level, :, 1] / h
        projected = [module.value_proj(v).view(2, v.shape[1], v.shape[2], heads, dim // heads).permute(0, 3, 4, 1, 2)
                     for v in values]
        expected = module.output_proj(naive_sampling(projected, locations, weights))
    assert out.shape == (2, 12, dim)
    assert (out - expected).abs().max() < 1e-5
    # under bf16 autocast (the engine's CUDA mode) the sampling itself stays float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_precision = module(query, reference, values)
    assert low_precision.dtype == torch.bfloat16
    assert (low_precision.float() - out).abs().max() < 0.05 * out.abs().max()


def test_reference_points_and_initial_offsets():
    reference = grid_reference_points(2, 4)
    assert reference.shape == (8, 2)
    torch.testing.assert_close(reference[5], torch.tensor([(1 + 0.5) / 4, (1 + 0.5) / 2]))
    module = MultiScaleDeformableAttention(16, 4, num_levels=1, num_points=2)
    bias = module.sampling_offsets.bias.view(4, 1, 2, 2)
    # Deformable DETR: head k points along its own direction, at 1 and 2 pixels
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0]]))
    torch.testing.assert_close(bias[1, 0], torch.tensor([[0.0, 1.0], [0.0, 2.0]]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(10, 4)


# ------------------------------------------------------------------------------ facts, config, counts

def test_facts_and_config():
    facts = DBSAM.facts
    assert facts.name == "dbsam" and facts.label_set == "lesion" and facts.promptable
    assert facts.cacheable_embeddings and facts.spatial_dims == 2 and facts.input_size == (256, 256)
    assert facts.required_modalities == ("flair",) and getattr(facts, "requires_box", True)
    config = DBSAM.default_config
    assert (config["optimizer"], config["learning_rate"], config["lr_schedule"], config["epochs"]) == \
        ("adamw", 1e-4, "poly", 12)
    assert (config["dropout"], config["drop_path"], config["box_jitter_px"]) == (0.4, 0.4, [0, 20])
    with torch.device("meta"):
        pair = DBSAM(modalities=["flair", "t1ce"], image_size=256)
        assert pair.facts.required_modalities == ("t1ce", "flair") and pair.modality_indices == (3, 1)
        for bad, message in [({"modalities": ["dwi"]}, "modalities"), ({"modalities": ["t1", "t2", "flair"]}, "one or two"),
                             ({"interaction_blocks": [5, 2]}, "interaction_blocks"),
                             ({"interaction_blocks": [12]}, "interaction_blocks"),
                             ({"conv_dim": 256}, "conv_dim"), ({"dropout": 1.0}, "dropout"),
                             ({"backbone": "vit_h"}, "unknown backbone"), ({"box_jitter_px": [5, 2]}, "box_jitter"),
                             ({"head_dim": 100, "image_size": 256}, "not a multiple")]:
            with pytest.raises(ValueError, match=message):
                DBSAM(**bad)
        with pytest.raises(ValueError, match="unknown config"):
            DBSAM(adapters=3)
    with pytest.raises(ValueError, match="smaller multiple of 64"):
        DBSAM(backbone="lite", image_size=1024)


def adapter_counts(block_dims, interaction_dims, conv_dim, head_dim, mlp_ratio=4.0, points=4,
                   conv_channels=(64, 128, 256, 256)):
    """Parameters of DB-SAM's learnable parts, from the architecture (not from the modules)."""
    def channel_attention(c):
        s = round(c * 0.25)
        return 2 * c + (9 * c + c) + (c * s + s + s * c + c) + (c * c + c)

    def direction(d, v):
        h, hidden = d // head_dim, int(round(d * mlp_ratio))
        return (2 * d + 2 * v + (d * h * points * 2 + h * points * 2) + (d * h * points + h * points)
                + (v * d + d) + (d * d + d) + 2 * d + (d * hidden + hidden) + (hidden * d + d))

    widths = [3, *conv_channels]
    conv = sum(widths[i] * widths[i + 1] * (9 if i < 2 else 1) + 2 * widths[i + 1] for i in range(4))
    conv += widths[-1] * conv_dim + conv_dim
    hidden = conv_dim // 4
    fusion = 2 * (conv_dim * hidden + hidden + hidden * conv_dim + conv_dim) + conv_dim  # + the fusion gate
    interactions = sum(direction(d, conv_dim) + direction(conv_dim, d) for d in interaction_dims)
    return sum(map(channel_attention, block_dims)) + conv + interactions + fusion


def test_parameter_counts_against_sam_vit_b():
    adapters = adapter_counts([768] * 12, [768] * 4, 768, 64)
    with torch.device("meta"):
        counts_1024 = DBSAM().parameter_counts()
        counts_256 = DBSAM(image_size=256).parameter_counts()
        model = DBSAM(image_size=256, train_neck=True)
    assert counts_1024["total"] == ENCODER_1024 + PROMPT_ENCODER + MASK_DECODER + adapters
    assert counts_1024["trainable"] == MASK_DECODER + adapters
    assert counts_256["total"] == ENCODER_256 + PROMPT_ENCODER + MASK_DECODER + adapters
    assert counts_256["trainable"] == counts_1024["trainable"]
    print(f"dbsam vit_b 1024: total {counts_1024['total']:,} ({counts_1024['total'] / SAM_VIT_B:.2f} x SAM ViT-B), "
          f"trainable {counts_1024['trainable']:,}")
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"channel_attention", "conv_branch", "interactions", "fusion", "backbone"}
    assert {n for n, p in model.backbone.named_parameters() if p.requires_grad} == \
        {f"mask_decoder.{n}" for n, _ in model.backbone.mask_decoder.named_parameters()} | \
        {f"image_encoder.neck.{n}" for n, _ in model.backbone.image_encoder.neck.named_parameters()}


def test_1024_shapes_on_the_meta_device():
    """The paper's size: 1024 ViT input, 64 x 64 embedding, 256 x 256 decoder output (meta tensors:
    every shape and dispatch is checked, no arithmetic done)."""
    with torch.device("meta"):
        model = DBSAM().eval()
    images = torch.empty(1, 4, 256, 256, device="meta")
    available = torch.ones(1, 4, dtype=torch.bool)
    boxes = torch.empty(1, 4, device="meta")
    assert model.backbone.image_size == 1024
    embeddings = model.encode(images, available)
    assert embeddings.shape == (1, 256, 64, 64)
    assert model.decode_proba(embeddings, available, boxes).shape == (1, 2, 256, 256)
    assert model(images, available, boxes).shape == (1, 2, 256, 256)


# ------------------------------------------------------------------------------ the network at 256

@pytest.fixture(scope="module")
def vit_256():
    torch.manual_seed(0)
    return DBSAM(image_size=256, **SMALL).eval()


def test_256_shapes_cache_and_errors(vit_256):
    torch.manual_seed(1)
    images = (255 * torch.rand(1, 4, 256, 256)).repeat(2, 1, 1, 1)
    images[1, :3] = 0  # the second slice: the same FLAIR, the rest missing (zero-filled by the engine)
    available = torch.tensor([[True] * 4, [False, False, False, True]])
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [50.0, 40.0, 200.0, 180.0]])
    with torch.no_grad():
        embeddings = vit_256.encode(images, available)
        assert embeddings.shape == (2, 256, 16, 16)
        # only FLAIR is read: the other modalities change nothing
        torch.testing.assert_close(embeddings[0], embeddings[1], atol=1e-4, rtol=1e-4)
        probabilities = vit_256.decode_proba(embeddings, available, boxes)
        assert probabilities.shape == (2, 2, 256, 256) and torch.isfinite(probabilities).all()
        torch.testing.assert_close(probabilities.sum(1), torch.ones(2, 256, 256))
        assert torch.equal(vit_256.predict_proba(images, available, boxes), probabilities)  # cached = uncached
        other_box = vit_256.decode_proba(embeddings, available, boxes.flip(0))
        assert (other_box - probabilities).abs().max() > 1e-3  # the box reaches the decoder
        logits = vit_256(images[:1], available[:1], boxes[:1])
    assert logits.shape == (1, 2, 256, 256) and torch.equal(logits[:, 0], torch.zeros(1, 256, 256))
    torch.testing.assert_close(torch.sigmoid(logits[:, 1]), probabilities[:1, 1], atol=1e-5, rtol=1e-4)
    with pytest.raises(BoxRequiredError):
        vit_256.predict_proba(images, available)
    with pytest.raises(MissingModalityError, match="FLAIR"):
        vit_256.encode(images, torch.tensor([[True, True, True, False]] * 2))
    with pytest.raises(ValueError, match="boxes must be"):
        vit_256.decode_proba(embeddings, available, boxes[:1])
    with pytest.raises(ValueError, match="takes images"):
        vit_256.encode(images[:, :, :128], available)


def test_boxes_from_masks():
    masks = torch.zeros(3, 256, 256, dtype=torch.long)
    masks[0, 100:120, 30:50] = 1           # rows 100-119, columns 30-49
    masks[1, 0:10, 250:256] = 2            # at the border: clipped
    generator = torch.Generator().manual_seed(0)
    exact = boxes_from_masks(masks, jitter=(0, 0), generator=generator)
    assert exact[0].tolist() == [30, 100, 50, 120] and exact[1].tolist() == [250, 0, 256, 10]
    for _ in range(20):
        boxes = boxes_from_masks(masks, generator=generator)
        x0, y0, x1, y1 = boxes[0].tolist()
        assert 10 <= x0 <= 30 and 80 <= y0 <= 100 and 50 <= x1 <= 70 and 120 <= y1 <= 140
        assert boxes[1, 1] == 0 and boxes[1, 2] == 256
        side_x, side_y = (boxes[2, 2:] - boxes[2, :2]).tolist()  # no lesion: a random box
        assert 16 <= side_x <= 128 and 16 <= side_y <= 128 and boxes[2].min() >= 0 and boxes[2].max() <= 256
    shifts = torch.stack([exact[0] - boxes_from_masks(masks, generator=generator)[0] for _ in range(50)])
    assert shifts.abs().max() == 20 and shifts.abs().min() == 0  # the whole 0-20 range is used
    assert (shifts[:, :2] >= 0).all() and (shifts[:, 2:] <= 0).all()  # sides only move outwards


@pytest.fixture(scope="module")
def sample_case():
    """A 2 mm sample case (prepared as the engine gets it) and its BraTS labels [z, y, x]."""
    images = generate_case(SampleParameters.random(3, resolution=2))
    seg = sitk.GetArrayFromImage(images.pop("seg"))
    return prepare_case(images), seg


@pytest.fixture(scope="module")
def lesion_batch(sample_case):
    """Two lesion slices of the sample case, as the engine gives them, and their labels."""
    case, seg = sample_case
    z = [int(i) for i in np.argsort((seg > 0).sum(axis=(1, 2)))[-2:]]
    target = torch.as_tensor(case.slice_geometry.to_network(seg[z][:, None].astype(np.float32), nearest=True))
    available = torch.as_tensor(case.available)[None].expand(len(z), -1)
    return case.network_slices(z), available, target[:, 0].long()


def one_step(model, batch, lr=1e-4):
    """One AdamW step on ``training_loss`` (boxes from the target); the loss before and after
    with the same random state (dropout, drop-path and box jitter identical)."""
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=model.config["weight_decay"])
    torch.manual_seed(5)
    loss_before = model.training_loss(batch)
    optimiser.zero_grad()
    loss_before.backward()
    optimiser.step()
    torch.manual_seed(5)
    with torch.no_grad():
        loss_after = model.training_loss(batch)
    return loss_before, loss_after


def test_one_step_vit_b_trains_only_the_adapters_and_decoder(lesion_batch):
    images, available, target = lesion_batch
    batch = {"images": images[:1], "available": available[:1], "target": target[:1]}
    assert target[:1].gt(0).any()
    torch.manual_seed(0)
    # without dropout and drop-path, so that every adapter's gradient is certainly non-zero
    model = DBSAM(image_size=256, dropout=0.0, drop_path=0.0, **SMALL).train()
    assert not model.backbone.image_encoder.training and not model.backbone.prompt_encoder.training
    assert model.conv_branch.training and model.backbone.mask_decoder.training
    frozen = {k: v.clone() for k, v in model.backbone.image_encoder.state_dict().items()}
    frozen.update({f"p.{k}": v.clone() for k, v in model.backbone.prompt_encoder.state_dict().items()})
    loss_before, loss_after = one_step(model, batch)
    for part in (model.backbone.image_encoder, model.backbone.prompt_encoder):
        assert all(p.grad is None for p in part.parameters())
    after = dict(model.backbone.image_encoder.state_dict())
    after.update({f"p.{k}": v for k, v in model.backbone.prompt_encoder.state_dict().items()})
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    # every learnable part on the ViT path got a gradient (the zero-initialised layers first), and the
    # fusion gate; the conv side reaches the output only through the gate, which starts closed
    # (issue 24: DB-SAM starts as the pretrained SAM), so its gradient is exactly zero at step 0 ...
    conv_side = ("interactions.1.conv_query.mlp.0.weight", "conv_branch.layers.0.weight",
                 "fusion.conv_attention.2.weight")
    for name in ("channel_attention.0.pointwise.weight", "channel_attention.11.pointwise.weight",
                 "interactions.0.vit_query.attention.output_proj.weight", "fusion.gate",
                 "backbone.mask_decoder.output_upscaling.0.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(model.get_parameter(name).grad.abs().sum() == 0 for name in conv_side)
    print(f"dbsam (vit_b 256) one AdamW step: loss {loss_before.item():.4f} -> {loss_after.item():.4f}")
    assert loss_after < loss_before
    # ... and non-zero once the first step has opened the gate.
    assert model.fusion.gate.abs().min() > 0
    model.zero_grad()
    torch.manual_seed(5)
    model.training_loss(batch).backward()
    for name in conv_side:
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_lite_backbone(lesion_batch):
    """backbone 'lite': TinyViT's real weights, channel attention at each block's width, 64 x 64
    embedding without pooling, cached = uncached, and one AdamW step lowers the loss."""
    from BrainLesionSAMLib.backbones.litemedsam import load_lite_medsam_state

    torch.manual_seed(0)
    model = DBSAM(backbone="lite", **SMALL)
    dims = (64, 128, 128, 160, 160, 160, 160, 160, 160, 320, 320, 320)
    assert [block.norm.normalized_shape[0] for block in model.channel_attention] == list(dims)
    assert model.backbone.image_size == 256
    adapters = adapter_counts(dims, [dims[5], dims[11]], 320, 32, mlp_ratio=0.5)
    counts = model.parameter_counts()
    assert counts["total"] == LITE_ENCODER + PROMPT_ENCODER + MASK_DECODER + adapters
    assert counts["trainable"] == MASK_DECODER + adapters
    published = load_lite_medsam_state()
    encoder = {k: v.clone() for k, v in model.backbone.image_encoder.state_dict().items()}
    assert all(torch.equal(encoder[k.removeprefix("image_encoder.")], v)
               for k, v in published.items() if k.startswith("image_encoder."))

    images, available, target = lesion_batch
    model.eval()
    with torch.no_grad():
        assert model.encode(images[:1], available[:1]).shape == (1, 256, 64, 64)

    model.train()
    assert not model.backbone.image_encoder.training  # BatchNorm of the frozen TinyViT keeps its statistics
    batch = {"images": images[1:], "available": available[1:], "target": target[1:]}
    loss_before, loss_after = one_step(model, batch)
    assert all(p.grad is None for p in model.backbone.image_encoder.parameters())
    assert all(torch.equal(v, encoder[k]) for k, v in model.backbone.image_encoder.state_dict().items())
    print(f"dbsam (lite) one AdamW step: loss {loss_before.item():.4f} -> {loss_after.item():.4f}")
    assert loss_after < loss_before


def test_training_loss_boxes(vit_256, monkeypatch):
    """training_loss passes the batch's boxes to forward, or derives them from the target (0-20 px
    out per side) when the batch has none, and returns the loss of forward's logits."""
    seen = []

    def forward(images, available, boxes=None):
        seen.append(boxes)
        return torch.cat([torch.zeros(len(images), 1, 256, 256), torch.full((len(images), 1, 256, 256), -2.0)], 1)

    monkeypatch.setattr(vit_256, "forward", forward)
    images, available = torch.zeros(1, 4, 256, 256), torch.ones(1, 4, dtype=torch.bool)
    target = torch.zeros(1, 256, 256, dtype=torch.long)
    target[0, 60:90, 70:120] = 2
    boxes = torch.tensor([[60.0, 50.0, 130.0, 100.0]])
    loss = vit_256.training_loss({"images": images, "available": available, "target": target, "boxes": boxes})
    assert seen[-1] is boxes
    torch.testing.assert_close(loss, vit_256.loss(forward(images, available), target))
    for _ in range(10):
        vit_256.training_loss({"images": images, "available": available, "target": target})
        x0, y0, x1, y1 = seen[-1][0].tolist()
        assert 50 <= x0 <= 70 and 40 <= y0 <= 60 and 120 <= x1 <= 140 and 90 <= y1 <= 110


def test_loss_is_dice_plus_ce_of_the_lesion_logit(vit_256):
    """Dice (squared denominators, over the batch) + binary CE of the lesion logit x, which is the
    softmax CE of forward's [0, x]; any label > 0 is lesion."""
    torch.manual_seed(3)
    x = torch.randn(2, 1, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    logits = torch.cat([torch.zeros_like(x), x], dim=1)
    p, t = torch.sigmoid(x)[:, 0], (target > 0).float()
    dice = 1 - (2 * (p * t).sum() + 1e-5) / ((p * p).sum() + (t * t).sum() + 1e-5)
    ce = F.cross_entropy(logits, (target > 0).long())
    torch.testing.assert_close(vit_256.loss(logits, target), dice + ce)


def test_engine_box_refinement_reuses_the_embeddings(vit_256, sample_case, monkeypatch):
    """Through the engine: a box over two slices encodes them once; a second box on the same case
    only decodes; nothing outside the box is labelled; no box is refused."""
    case, seg = sample_case
    z = int((seg > 0).sum(axis=(1, 2)).argmax())
    y, x = np.nonzero(seg[z] > 0)
    encoded = []
    encode = vit_256.encode
    monkeypatch.setattr(vit_256, "encode", lambda images, available: encoded.append(len(images)) or
                        encode(images, available))
    engine = InferenceEngine(vit_256, "cpu", batch_size=2, embedding_cache=EmbeddingCache())
    first = Box(int(x.min()) - 4, int(y.min()) - 4, z, int(x.max()) + 4, int(y.max()) + 4, z + 1)
    labels = sitk.GetArrayFromImage(engine.segment(case, box=first).labels)
    assert encoded == [2]
    assert not labels[~first.mask(labels.shape)].any()
    second = Box(int(x.min()), int(y.min()), z, int(x.max()), int(y.max()), z + 1)
    engine.segment(case, box=second)
    assert encoded == [2]  # the box refinement ran only the prompt encoder and mask decoder
    with pytest.raises(BrainLesionSAMError, match="box"):
        engine.segment(case)


def test_dbsam_starts_as_backbone(lesion_batch):
    """At initialisation every added path is a pass-through: DB-SAM's output is its frozen backbone's
    own (LiteMedSAM with its real weights: encoder, neck, box prompt, decoder) on the same FLAIR slice
    and box, within float tolerance; with the paper's literal fusion after every block too. The
    reference is the backbone's plain forward, which never calls DB-SAM's hooks."""
    images, available, _ = lesion_batch
    boxes = torch.tensor([[70.0, 60.0, 190.0, 170.0]])
    flair = images[:1, 3:4].expand(-1, 3, -1, -1)
    for config in ({}, {"interaction_blocks": "every_block", "mlp_ratio": 0.5}):
        torch.manual_seed(0)
        model = DBSAM(backbone="lite", **config).eval()
        with torch.no_grad():
            logits = model(images[:1], available[:1], boxes)
            reference = model.backbone(flair, boxes)     # [1, 1, 256, 256]: LiteMedSAM's own output
        torch.testing.assert_close(logits[:, 1:], reference, atol=1e-4, rtol=1e-4)
        assert logits[:, 1:].abs().max() > 1.0   # a real mask logit map, not zeros on both sides
    assert len(model.interactions) == 12 and model.interaction_blocks == list(range(12))
    # The literal eq. 2 (zero_init off) mixes in the random conv branch from the start.
    torch.manual_seed(0)
    literal = DBSAM(backbone="lite", zero_init=False, **SMALL).eval()
    with torch.no_grad():
        differs = (literal(images[:1], available[:1], boxes)[:, 1:] - reference).abs().max()
    assert differs > 1e-2
