"""MoME on CPU with a small config (4-32 filters, 16^3 patches): scales, fusion, curriculum, expert
matching, one SGD step, modality combination, gate weights, and a whole 2 mm case through the engine.
The default (paper) config is only built on the meta device, to count its parameters.

Everything runs on one thread: on the shared 2-core machine a second OpenMP thread made these small
3D convolutions up to 8 times slower, not faster."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from BrainLesionSAMLib.checkpoints import load_method, save_checkpoint
from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.engine import InferenceEngine
from BrainLesionSAMLib.errors import MissingModalityError
from BrainLesionSAMLib.methods import build_method, get_method_class
from BrainLesionSAMLib.methods.mome import (MoME, curriculum_weights, nnunet_deep_supervision_weights,
                                            nnunet_dynunet)
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case

SMALL = {"filters": (4, 8, 16, 32), "kernel_sizes": (3, 3, 3, 3), "strides": (1, 2, 2, 2),
         "deep_supervision_heads": 2, "patch_size": (16, 16, 16)}
P = 16  # spatial size of the unit tests' patches
T1, T1CE, T2, FLAIR = range(4)


def small(**overrides) -> MoME:
    torch.manual_seed(0)
    return MoME(**{**SMALL, **overrides})


def plain_unet_parameters(in_channels, out_channels, filters, heads, kernel=3):
    """Independent count of nnU-Net's plain-conv U-Net as DynUNet builds it: 3^3 convs without
    bias, affine instance norms, 2^3 transposed convs with bias, 1x1 heads with bias."""
    k3, count, previous = kernel ** 3, 0, in_channels
    for f in filters:
        count += previous * f * k3 + f * f * k3 + 4 * f
        previous = f
    for below, f in zip(filters[:0:-1], filters[-2::-1]):
        count += below * f * 8 + f + 2 * f * f * k3 + f * f * k3 + 4 * f
    return count + sum(f * out_channels + out_channels for f in filters[:heads + 1])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return small().eval()


@pytest.fixture(scope="module")
def case_images():
    """A generated 2 mm case: four modalities and 'seg'."""
    return generate_case(SampleParameters.random(3, resolution=2))


@pytest.fixture(scope="module")
def lesion_patch(case_images):
    """A 24^3 patch of the 2 mm case (four modalities) around the lesion's centre, and its lesion mask."""
    seg = sitk.GetArrayFromImage(case_images["seg"])
    case = prepare_case({m: case_images[m] for m in MODALITIES})
    centre = [int(round(c)) for c in np.argwhere(seg > 0).mean(axis=0)]
    window = tuple(slice(c - 12, c + 12) for c in centre)
    patch = torch.as_tensor(case.images[(slice(None),) + window])[None]
    target = torch.as_tensor(seg[window] > 0).long()[None]
    return patch, target


def test_registration_facts_and_paper_defaults():
    assert get_method_class("mome") is MoME
    facts = MoME.facts
    assert facts.name == "mome" and facts.label_set == "lesion" and facts.labels == (0, 1)
    assert facts.modalities == MODALITIES and facts.required_modalities == () and facts.tolerates_missing
    assert facts.spatial_dims == 3 and facts.input_size == (128, 128, 128)
    assert not facts.promptable and not facts.cacheable_embeddings
    c = MoME.default_config
    assert c["experts"] == ("t1", "t1ce", "t2", "flair", "dwi")
    assert (c["filters"], c["strides"], c["deep_supervision_heads"]) == ((32, 64, 128, 256, 320, 320),
                                                                         (1, 2, 2, 2, 2, 2), 4)
    assert (c["optimizer"], c["learning_rate"], c["momentum"], c["nesterov"], c["weight_decay"]) == (
        "sgd", 1e-3, 0.99, True, 3e-5)
    assert (c["lr_schedule"], c["poly_exponent"], c["epochs"], c["gate_grad_clip"]) == ("poly", 0.9, 800, 12.0)
    assert c["gate_activation"] == "none" and c["combine"] == "mean" and c["training_stage"] == "mome"
    # An instance configured with another patch size carries it in its own facts (the engine's window).
    assert small().facts.input_size == (16, 16, 16) and MoME.facts.input_size == (128, 128, 128)
    assert nnunet_deep_supervision_weights(5) == pytest.approx(np.array([1, .5, .25, .125, 0]) / 1.875)
    assert nnunet_deep_supervision_weights(1) == (1.0,)


@pytest.mark.parametrize("overrides, message", [
    ({"experts": ()}, "experts must be"),
    ({"experts": ("t1", "t1")}, "experts must be"),
    ({"experts": "flair"}, "experts must be"),
    ({"filters": (4, 8, 16)}, "one entry per stage"),
    ({"strides": (2, 2, 2, 2)}, "strides\\[0\\] must be 1"),
    ({"kernel_sizes": (3, 2, 3, 3)}, "odd"),
    ({"patch_size": (16, 16, 20)}, "divisible by the product of the strides \\(8\\)"),
    ({"deep_supervision_heads": 3}, "deep_supervision_heads must be 1 to 2"),
    ({"deep_supervision_weights": (1.0, 0.5)}, "deep_supervision_weights must be None or 3"),
    ({"gate_activation": "relu"}, "gate_activation must be one of"),
    ({"combine": "vote"}, "combine must be one of"),
    ({"training_stage": "gate"}, "training_stage must be one of"),
    ({"optimizer": "adam"}, "optimizer must be one of"),
    ({"inference_batch": 0}, "inference_batch must be a positive integer"),
    ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
    ({"experts_count": 4}, "unknown config key"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        MoME(**{**SMALL, **overrides})


def test_parameter_counts_per_expert_and_total():
    with torch.device("meta"):
        default = MoME()
    counts = default.parameter_counts()
    nnunet = plain_unet_parameters(1, 2, (32, 64, 128, 256, 320, 320), heads=4)
    gate = plain_unet_parameters(1 + 5 * 32, 5 * 2, (32, 64, 128, 256, 320, 320), heads=4)
    assert counts["per_expert"] == nnunet == 31_191_754
    assert counts["gate"] == gate == 31_336_434
    assert counts["total"] == counts["trainable"] == 5 * nnunet + gate == 187_295_204
    # One task-specific nnU-Net of the same config is one DynUNet (which counts each block once).
    with torch.device("meta"):
        single = nnunet_dynunet(1, 2, (32, 64, 128, 256, 320, 320), (3,) * 6, (1, 2, 2, 2, 2, 2), 4)
    assert sum(p.numel() for p in single.parameters()) == nnunet
    four = small(experts=("t1", "t1ce", "t2", "flair")).parameter_counts()
    assert four["gate"] == plain_unet_parameters(1 + 4 * 4, 4 * 2, SMALL["filters"], heads=2)
    assert four["total"] == 4 * plain_unet_parameters(1, 2, SMALL["filters"], heads=2) + four["gate"]


def test_output_shapes_at_every_scale_and_the_fusion(model):
    torch.manual_seed(1)
    x = torch.rand(2, 1, P, P, P)
    with torch.no_grad():
        out = model.network(x)
    sizes = [(16,) * 3, (8,) * 3, (4,) * 3]
    assert len(out.expert_logits) == 5
    with torch.no_grad():
        assert model.network.experts[0](x)[0].shape == (2, 4, P, P, P)  # first-stage features
    for logits in out.expert_logits:
        assert [tuple(t.shape) for t in logits] == [(2, 2) + s for s in sizes]
    assert [tuple(g.shape) for g in out.gates] == [(2, 5, 2) + s for s in sizes]
    assert [tuple(f.shape) for f in out.fused] == [(2, 2) + s for s in sizes]
    # The gate sees the image and every expert's first-stage features: 1 + 5 x 4 channels; its
    # channel i * 2 + k is expert i, class k (no activation by default, as the authors' code).
    assert model.network.gate.unet.input_block.conv1.conv.weight.shape[1] == 1 + 5 * 4
    with torch.no_grad():
        _, raw = model.network.gate.unet(torch.cat([x] + [e(x)[0] for e in model.network.experts], dim=1))
    for s in range(3):
        torch.testing.assert_close(out.gates[s], raw[s].reshape(2, 5, 2, *raw[s].shape[2:]))
    for s in range(3):
        expected = sum(out.expert_logits[i][s] * out.gates[s][:, i] for i in range(5))
        torch.testing.assert_close(out.fused[s], expected)
    assert not torch.allclose(out.expert_logits[0][0], out.expert_logits[1][0])  # independent experts
    with torch.no_grad():
        only_full = model.network(x, scales=1)
    assert len(only_full.fused) == 1
    torch.testing.assert_close(only_full.fused[0], out.fused[0])


def test_expert_is_dynunet_with_native_resolution_heads(model):
    """Our forward loop over DynUNet's blocks gives DynUNet's own outputs (its deep-supervision
    outputs are ours interpolated to full size), and our first-stage features are its input block's."""
    expert = model.network.experts[2]
    reference = nnunet_dynunet(1, 2, SMALL["filters"], SMALL["kernel_sizes"], SMALL["strides"], 2)
    result = reference.load_state_dict(expert.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.startswith("skip_layers.") for k in result.missing_keys)
    torch.manual_seed(2)
    x = torch.rand(1, 1, P, P, P)
    with torch.no_grad():
        features, logits = expert(x)
        torch.testing.assert_close(features, reference.input_block(x))
        torch.testing.assert_close(logits[0], reference.eval()(x))
        stacked = reference.train()(x)
    for s in range(3):
        torch.testing.assert_close(stacked[:, s], F.interpolate(logits[s], size=(P, P, P)))


def test_softmax_gate_weights_sum_to_one_over_experts():
    model = small(gate_activation="softmax").eval()
    with torch.no_grad():
        gates = model.network(torch.rand(1, 1, P, P, P)).gates
    for gate in gates:
        torch.testing.assert_close(gate.sum(dim=1), torch.ones_like(gate[:, 0]))
        assert (gate >= 0).all()


def test_curriculum_weights_follow_the_formula_and_move_from_experts_to_fused():
    progress = np.linspace(0, 1, 21)
    weights = np.array([curriculum_weights(r) for r in progress])
    np.testing.assert_allclose(weights[:, 0], (1 - progress) ** 2)
    np.testing.assert_allclose(weights[:, 1], 1 - (1 - progress) ** 2)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)
    assert (np.diff(weights[:, 0]) < 0).all() and (np.diff(weights[:, 1]) > 0).all()
    assert curriculum_weights(0) == (1.0, 0.0) and curriculum_weights(1) == (0.0, 1.0)
    assert curriculum_weights(0.5) == (0.25, 0.75)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="progress must be in"):
            curriculum_weights(bad)
    assert small(training_stage="experts").curriculum_weights(0.7) == (1.0, 0.0)


def test_training_loss_is_the_curriculum_mix_of_expert_and_fused_losses(model):
    torch.manual_seed(3)
    images = 255 * torch.rand(2, 4, P, P, P)
    target = (torch.rand(2, P, P, P) > 0.7).long()
    batch = {"images": images, "available": torch.ones(2, 4, dtype=torch.bool), "target": target,
             "modality": torch.tensor([T1CE, FLAIR])}
    with torch.no_grad():
        out = model.network(torch.stack([images[0, T1CE], images[1, FLAIR]])[:, None] / 255)
        matched = [torch.stack([out.expert_logits[1][s][0], out.expert_logits[3][s][1]]) for s in range(3)]
        expert_loss, fused_loss = model.loss(matched, target), model.loss(out.fused, target)
        assert abs(expert_loss - fused_loss) > 1e-3
        for r in (0.0, 0.3, 0.8, 1.0):
            w_expert, w_fused = curriculum_weights(r)
            torch.testing.assert_close(model.training_loss(batch, r), w_expert * expert_loss + w_fused * fused_loss)


def test_modality_matched_expert_loss_picks_the_right_expert(model):
    torch.manual_seed(4)
    images = 255 * torch.rand(2, 4, P, P, P)
    target = (torch.rand(2, P, P, P) > 0.7).long()
    x = torch.stack([images[0, T2], images[1, T1]])[:, None] / 255
    with torch.no_grad():
        out = model.network(x)
        per_sample = [[model.loss([t[b:b + 1] for t in logits], target[b:b + 1]) for logits in out.expert_logits]
                      for b in range(2)]
        loss = model.training_loss({"images": images, "available": torch.ones(2, 4, dtype=torch.bool),
                                    "target": target, "modality": torch.tensor([T2, T1])}, progress=0.0)
    torch.testing.assert_close(loss, (per_sample[0][2] + per_sample[1][0]) / 2)
    for wrong_0 in range(5):
        for wrong_1 in range(5):
            if (wrong_0, wrong_1) != (2, 0):
                assert abs(loss - (per_sample[0][wrong_0] + per_sample[1][wrong_1]) / 2) > 1e-4

    # Only the matching experts get gradients; the gate none at r = 0 (and in the 'experts' stage).
    for stage, progress in (("mome", 0.0), ("experts", 0.6)):
        trained = small(training_stage=stage).train()
        trained.training_loss({"images": images, "available": torch.ones(2, 4, dtype=torch.bool),
                               "target": target, "modality": torch.tensor([T2, T1])}, progress).backward()
        has_gradient = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
                        for e in trained.network.experts]
        assert has_gradient == [True, False, True, False, False], stage
        assert all(p.grad is None for p in trained.network.gate.parameters())


def test_a_batch_without_modality_trains_every_available_modality(model):
    torch.manual_seed(5)
    images = 255 * torch.rand(1, 4, P, P, P)
    target = (torch.rand(1, P, P, P) > 0.7).long()
    available = torch.tensor([[False, True, False, True]])
    with torch.no_grad():
        expanded = model.training_loss({"images": images, "available": available, "target": target}, 0.4)
        each = [model.training_loss({"images": images, "available": available, "target": target,
                                     "modality": torch.tensor([m])}, 0.4) for m in (T1CE, FLAIR)]
    torch.testing.assert_close(expanded, (each[0] + each[1]) / 2)
    with pytest.raises(ValueError, match="no expert for modality 't1ce'"):
        small(experts=("t1", "t2", "flair")).training_loss(
            {"images": images, "available": available, "target": target, "modality": torch.tensor([T1CE])})
    with pytest.raises(ValueError, match="marks missing"):
        model.training_loss({"images": images, "available": available, "target": target,
                             "modality": torch.tensor([T1])})


def test_one_sgd_step_lowers_the_loss(lesion_patch):
    patch, target = lesion_patch
    assert target.any() and not target.all()
    model = small().train()
    batch = {"images": patch.repeat(2, 1, 1, 1, 1), "available": torch.ones(2, 4, dtype=torch.bool),
             "target": target.repeat(2, 1, 1, 1), "modality": torch.tensor([FLAIR, T1CE])}
    c = model.config
    optimiser = torch.optim.SGD(model.parameters(), lr=c["learning_rate"] * 0.5 ** c["poly_exponent"],
                                momentum=c["momentum"], nesterov=c["nesterov"], weight_decay=c["weight_decay"])
    assert (c["learning_rate"], c["momentum"], c["nesterov"], c["weight_decay"]) == (1e-3, 0.99, True, 3e-5)
    loss_before = model.training_loss(batch, progress=0.5)
    optimiser.zero_grad()
    loss_before.backward()
    torch.nn.utils.clip_grad_norm_(model.network.gate.parameters(), c["gate_grad_clip"])
    gate_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.network.gate.parameters()]))
    assert gate_norm <= 12.0 + 1e-4
    optimiser.step()
    with torch.no_grad():
        loss_after = model.training_loss(batch, progress=0.5)
    print(f"mome one SGD step: loss {loss_before.item():.5f} -> {loss_after.item():.5f}")
    assert loss_after < loss_before


def test_several_modalities_are_run_one_by_one_and_combined(model):
    torch.manual_seed(7)
    images = 255 * torch.rand(1, 4, P, P, P)
    every = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        combined = model.predict_proba(images, every)
        alone = [model.predict_proba(images, torch.eye(4, dtype=torch.bool)[m][None]) for m in range(4)]
        torch.testing.assert_close(combined, sum(alone) / 4)
        torch.testing.assert_close(torch.softmax(model(images, every), dim=1), combined)
        # A missing channel's content does not matter.
        two = torch.tensor([[True, False, False, True]])
        changed = images.clone()
        changed[:, [1, 2]] = 255 * torch.rand(1, 2, P, P, P)
        torch.testing.assert_close(model.predict_proba(changed, two), model.predict_proba(images, two))
        torch.testing.assert_close(model.predict_proba(images, two), (alone[0] + alone[3]) / 2)
        # A batch of two samples with different modalities, and other inference batch sizes.
        pair = model.predict_proba(images.repeat(2, 1, 1, 1, 1), torch.cat([two, every]))
        torch.testing.assert_close(pair[0], (alone[0][0] + alone[3][0]) / 2)
        torch.testing.assert_close(pair[1], combined[0])
        chunked = small(inference_batch=3).eval()
        torch.testing.assert_close(chunked.predict_proba(images, every), combined)
        maximum = small(combine="max").eval().predict_proba(images, every)
        torch.testing.assert_close(maximum[:, 1], torch.stack([a[:, 1] for a in alone]).amax(dim=0))
        torch.testing.assert_close(maximum.sum(dim=1), torch.ones(1, P, P, P))
    with pytest.raises(MissingModalityError, match="at least one"):
        model.predict_proba(images, torch.zeros(1, 4, dtype=torch.bool))


def test_case_weights_are_the_gate_share_over_brain_voxels():
    model = small(gate_activation="softmax").eval()
    torch.manual_seed(8)
    images = 255 * torch.rand(1, 4, P, P, P)
    images[..., :6] = 0  # outside the brain
    available = torch.tensor([[False, True, False, True]])
    model.start_case()
    assert model.case_weights() == {}
    with torch.no_grad():
        model.predict_proba(images, available)
        weights = model.case_weights()
        expected = {}
        for m, name in ((T1CE, "T1CE"), (FLAIR, "FLAIR")):
            gate = model.network(images[:, m:m + 1] / 255, scales=1).gates[0][0]  # [E, K, D, H, W]
            expected[m] = gate[..., 6:].mean(dim=(1, 2, 3, 4))
            assert weights[f"gate, {name} input"] == pytest.approx(dict(zip(model.expert_names, expected[m].tolist())),
                                                                 abs=1e-5)
    assert set(weights) == {"gate", "gate, T1CE input", "gate, FLAIR input"}
    both = (expected[T1CE] + expected[FLAIR]) / 2
    assert weights["gate"] == pytest.approx(dict(zip(model.expert_names, both.tolist())), abs=1e-5)
    assert all(sum(group.values()) == pytest.approx(1.0) for group in weights.values())
    model.start_case()
    assert model.case_weights() == {}
    model.train()
    with torch.no_grad():
        model.predict_proba(images, available)
    assert model.case_weights() == {}  # training passes are not a case


def test_checkpoint_round_trip(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "mome.safetensors")
    loaded = load_method("mome", path)
    assert loaded.facts.input_size == (16, 16, 16) and loaded.expert_names == model.expert_names
    images = 255 * torch.rand(1, 4, P, P, P)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(images, torch.ones(1, 4, dtype=torch.bool)),
                                   model.predict_proba(images, torch.ones(1, 4, dtype=torch.bool)))


def test_full_2mm_case_through_the_engine_on_cpu(case_images):
    """A whole 2 mm case (T1CE + FLAIR) through the engine's sliding window, with two experts to keep
    it quick on the CPU: labels on the reference grid, probabilities, per-case gate weights."""
    case = prepare_case({m: case_images[m] for m in ("t1ce", "flair")})
    assert case.shape_zyx == (78, 120, 120) and case.modalities == ("t1ce", "flair")
    torch.manual_seed(0)
    method = build_method("mome", {**SMALL, "experts": ("t1ce", "flair"), "patch_size": (64, 128, 128),
                                   "inference_batch": 2})
    windows = []
    original = method.predict_proba

    def spy(images, available, boxes=None):
        windows.append((tuple(images.shape), available.tolist()))
        return original(images, available, boxes)

    method.predict_proba = spy
    engine = InferenceEngine(method, device="cpu", batch_size=2)
    result = engine.segment(case, return_probabilities=True)
    labels = sitk.GetArrayFromImage(result.labels)
    assert result.labels.GetSize() == case.reference.GetSize() == (120, 120, 78) and result.device == "cpu"
    assert result.labels.GetSpacing() == (2.0, 2.0, 2.0)
    assert result.labels.GetOrigin() == case.reference.GetOrigin()
    assert set(np.unique(labels)) <= {0, 1} and not labels[~case.brain_mask].any()
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    assert probabilities.shape == (78, 120, 120, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    # MONAI's sliding window with the configured patch (y, x padded to 128): two windows along z.
    assert windows == [((2, 4, 64, 128, 128), [[False, True, False, True]] * 2)]
    weights = result.case_weights
    assert set(weights) == {"gate", "gate, T1CE input", "gate, FLAIR input"}
    assert list(weights["gate"]) == ["t1ce", "flair"] and sum(weights["gate"].values()) == pytest.approx(1.0)
    print(f"mome small config, 2 mm case, 2 modalities: {result.timings['network_s']:.1f} s network time")


def test_matched_expert_prediction_is_the_inputs_own_expert_alone(model):
    """``prediction='matched_expert'`` (the experts-against-mixture ablation): the same weights give
    the softmax of the FLAIR expert's full-resolution logits on a FLAIR input, of the T1 expert's on
    a T1 input, instead of the gated fusion."""
    ablation = MoME(**{**SMALL, "prediction": "matched_expert"}).eval()
    ablation.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    images = torch.rand(2, 4, P, P, P) * 255
    available = torch.tensor([[False, False, False, True], [True, False, False, False]])
    with torch.no_grad():
        got = ablation.predict_proba(images, available)
        x = MoME.scale_input(torch.stack([images[0, FLAIR], images[1, T1]])[:, None])
        flair = torch.softmax(model.network.experts[model.expert_index("flair")](x[:1])[1][0], dim=1)
        t1 = torch.softmax(model.network.experts[model.expert_index("t1")](x[1:])[1][0], dim=1)
        fused = model.predict_proba(images, available)
    torch.testing.assert_close(got, torch.cat([flair, t1]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, fused, atol=1e-3)
    with pytest.raises(ValueError, match="prediction"):
        MoME(**{**SMALL, "prediction": "gate"})


def test_a_working_voxel_size_runs_the_network_on_the_resized_case(case_images, monkeypatch):
    """``working_spacing_mm`` (the CPU release works at 2 mm): the engine hands the sliding window
    the case resized to that voxel size (here 4 mm over the 2 mm case: every 2 x 2 x 2 block's mean,
    numpy's reshape-mean as the reference) and returns labels and probabilities on the case's own
    grid."""
    import monai.inferers

    case = prepare_case({m: case_images[m] for m in ("flair",)})
    torch.manual_seed(0)
    method = build_method("mome", {**SMALL, "experts": ("flair",), "patch_size": (32, 32, 32),
                                   "working_spacing_mm": 4.0})
    assert method.facts.working_spacing_mm == 4.0 and method.facts.input_size == (32, 32, 32)
    seen = []
    original = monai.inferers.sliding_window_inference

    def spy(inputs, *args, **kwargs):
        seen.append(inputs.clone())
        return original(inputs, *args, **kwargs)

    monkeypatch.setattr(monai.inferers, "sliding_window_inference", spy)
    result = InferenceEngine(method, device="cpu", batch_size=4).segment(case, return_probabilities=True)
    volume, = seen
    assert volume.shape == (1, 4, 39, 60, 60)
    blocks = case.images.reshape(4, 39, 2, 60, 2, 60, 2).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(volume[0].numpy(), blocks, atol=1e-3)
    assert result.labels.GetSize() == case.reference.GetSize() and result.labels.GetSpacing() == (2.0, 2.0, 2.0)
    probabilities = sitk.GetArrayFromImage(result.probabilities)
    assert probabilities.shape == (78, 120, 120, 2)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="working_spacing_mm"):
        build_method("mome", {**SMALL, "working_spacing_mm": 0})


def test_mome_stage2_starts_from_experts(tmp_path):
    """The paper's two stages as two runs: stage 1 (mome_experts_smoke: each sample trains its own
    modality's expert), then stage 2 (mome_smoke, the curriculum) with init_from = stage 1's run.
    At stage 2's step 0 its experts are stage 1's trained experts, tensor for tensor (not the random
    initialisation), and the run's recorded initial weights are stage 1's final ones."""
    import json

    from BrainLesionSAMLib.checkpoints import load_checkpoint
    from Training.config import TrainingConfigError, load_config
    from Training.trainer import Trainer

    quiet = {"log": lambda message: None}
    first_dir, second_dir = tmp_path / "stage1", tmp_path / "stage2"
    first = Trainer(load_config("mome_experts_smoke", [f"output.dir={json.dumps(str(first_dir))}"]), **quiet).run()
    experts, header = load_checkpoint(first_dir / "final.safetensors", expected_method="mome")
    assert header["config"]["training_stage"] == "experts" and header["sha256"] == first["rank_weight_sha256"][0]

    config = load_config("mome_smoke", [f"output.dir={json.dumps(str(second_dir))}",
                                        f"init_from={json.dumps(str(first_dir))}"])
    assert config["method_config"].get("training_stage", "mome") == "mome"
    trainer = Trainer(config, **quiet)
    at_step_0 = trainer._build_method(MoME).state_dict()
    torch.manual_seed(config["train"]["seed"])   # what stage 2 would start from without init_from
    random_start = MoME(**config["method_config"]).state_dict()
    keys = [k for k in experts if k.startswith("network.experts.")]
    assert len(keys) > 0 and at_step_0.keys() == experts.keys()
    assert all(torch.equal(at_step_0[k], experts[k]) for k in keys)
    moved = [k for k in keys if not torch.equal(random_start[k], experts[k])]
    assert moved, "stage 1 left the experts at their random initialisation: the test could not tell them apart"

    # The documented command: brainlesionsam-train --config mome_smoke --init-from <stage 1 run>.
    from Training import train as train_cli

    assert train_cli.main(["--config", "mome_smoke", "--init-from", str(first_dir),
                           f"output.dir={json.dumps(str(second_dir))}"]) == 0
    second = json.loads((second_dir / "run.json").read_text())
    assert second["initial_weight_sha256"] == header["sha256"] != second["rank_weight_sha256"][0]
    assert json.loads((second_dir / "config.json").read_text())["init_from"] == str(first_dir.absolute())

    # A network of another shape cannot start from stage 1: a clear error, nothing trained.
    other = load_config("mome_smoke", [f"output.dir={json.dumps(str(tmp_path / 'other'))}",
                                       f"init_from={json.dumps(str(first_dir / 'final.safetensors'))}",
                                       "method_config.filters=[4, 8, 8, 8]"])
    with pytest.raises(TrainingConfigError, match="does not fit method 'mome'"):
        Trainer(other, **quiet)._build_method(MoME)
    missing = load_config("mome_smoke", [f"init_from={json.dumps(str(tmp_path / 'nowhere'))}",
                                         f"output.dir={json.dumps(str(tmp_path / 'other'))}"])
    with pytest.raises(TrainingConfigError, match="nowhere does not exist"):
        Trainer(missing, **quiet)._build_method(MoME)
