"""Mirror test-time augmentation and its uncertainty map (BrainLesionSAMLib/uncertainty.py, the engine's
``mirror_tta``): the map against an independent two-pass computation on awkward geometry, zero for a
network whose output is mirror-symmetric, the box prompt mirrored with the image, the patient's
left-right axis found from the direction matrix, the 3D patch path, and TTA off unchanged."""
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib import engine as engine_module
from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine
from BrainLesionSAMLib.errors import GeometryError
from BrainLesionSAMLib.methods import SegmentationMethod, build_method
from BrainLesionSAMLib.pipeline import segment_images
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.uncertainty import disagreement, mirror_axis, mirror_network_box

from conftest import blob_case, oblique_direction
from test_engine import BoxedConv, FlairOnly3D, naive_reference

ROWS_LEFT_RIGHT = (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)   # index j (array y) along physical x
SAGITTAL = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)          # index k (array z) along physical x


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_method("unet2d").eval()


def case_with(direction):
    images, labels = blob_case((9, 53, 41), spacing=(0.9, 1.1, 3.0), origin=(10.0, -20.0, 5.0), direction=direction)
    return prepare_case(images), labels


def two_pass_reference(model, case, flip_dim):
    """Per slice, written apart from the engine: the plain and the mirrored pass's probabilities
    [K, Z, Y, X] (mirrored on the network grid along ``flip_dim`` of [N, C, H, W], flipped back)."""
    shape = (len(model.facts.labels),) + case.shape_zyx
    plain, mirrored = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    plain[0] = mirrored[0] = 1.0
    available = torch.as_tensor(case.available)[None]
    geometry = case.slice_geometry
    for z in case.brain_slices():
        images = case.network_slices([z])
        with torch.no_grad():
            plain[:, z] = geometry.from_network(model.predict_proba(images, available))[0].numpy()
            flipped = model.predict_proba(torch.flip(images, [flip_dim]), available)
            mirrored[:, z] = geometry.from_network(torch.flip(flipped, [flip_dim]))[0].numpy()
    return plain, mirrored


@pytest.mark.parametrize("direction, flip_dim", [(oblique_direction(30), 3), (ROWS_LEFT_RIGHT, 2)],
                         ids=["oblique, columns left-right", "rows left-right"])
def test_map_is_the_disagreement_of_the_plain_and_the_mirrored_pass(model, direction, flip_dim):
    case, labels = case_with(direction)
    fractions = []
    result = InferenceEngine(model, "cpu", batch_size=3, min_component_ml=0, min_component_confidence=0).segment(
        case, return_probabilities=True, mirror_tta=True, progress=lambda f, m: fractions.append(f))
    plain, mirrored = two_pass_reference(model, case, flip_dim)

    uncertainty = result.uncertainty
    for image in (uncertainty, result.labels):
        assert image.GetSize() == labels.GetSize() and image.GetSpacing() == labels.GetSpacing()
        assert image.GetOrigin() == labels.GetOrigin() and image.GetDirection() == labels.GetDirection()
    values = sitk.GetArrayFromImage(uncertainty)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0
    expected = np.where(case.brain_mask, 0.5 * np.abs(plain - mirrored).sum(0), 0.0)
    np.testing.assert_allclose(values, expected, atol=2e-5)
    assert values.max() > 0.05, "a random network disagrees with its mirror image somewhere"

    mean = 0.5 * (plain + mirrored)
    probabilities = np.moveaxis(sitk.GetArrayFromImage(result.probabilities), -1, 0)
    np.testing.assert_allclose(probabilities[:, case.brain_mask], mean[:, case.brain_mask], atol=2e-5)
    lookup = np.array(model.facts.labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels)[case.brain_mask],
                                  lookup[probabilities.argmax(0)][case.brain_mask])
    assert fractions == sorted(fractions) and fractions[0] >= 0.0 and fractions[-1] == 1.0


class MirrorSymmetric(SegmentationMethod):
    """A method whose output is exactly mirror-symmetric: unet2d averaged with its mirror image."""

    facts = dataclasses.replace(build_method("unet2d").facts, name="test-symmetric")

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def predict_proba(self, images, available, boxes=None):
        plain = self.inner.predict_proba(images, available)
        return 0.5 * (plain + self.inner.predict_proba(images.flip(3), available).flip(3))

    def forward(self, images, available, boxes=None):
        return torch.log(self.predict_proba(images, available))


def test_a_mirror_symmetric_network_has_zero_uncertainty_and_the_same_labels(model):
    case, _ = case_with(oblique_direction(30))
    symmetric = MirrorSymmetric(model).eval()
    engine = InferenceEngine(symmetric, "cpu")
    with_tta = engine.segment(case, mirror_tta=True, return_probabilities=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(with_tta.uncertainty), 0.0, atol=1e-6)
    without = engine.segment(case, return_probabilities=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(with_tta.probabilities),
                               sitk.GetArrayFromImage(without.probabilities), atol=1e-6)


def test_tta_off_is_the_plain_result_bit_for_bit(model):
    case, _ = case_with(oblique_direction(30))
    engine = InferenceEngine(model, "cpu", min_component_ml=0, min_component_confidence=0)
    result = engine.segment(case, return_probabilities=True, mirror_tta=False)
    assert result.uncertainty is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), naive_reference(model, case))
    default = engine.segment(case, return_probabilities=True)
    assert np.array_equal(sitk.GetArrayFromImage(result.probabilities), sitk.GetArrayFromImage(default.probabilities))


def test_disagreement_is_the_total_variation_distance():
    p = np.array([[1.0, 0.5, 0.2], [0.0, 0.5, 0.3], [0.0, 0.0, 0.5]], np.float32)   # [K=3, 3 voxels]
    q = np.array([[0.0, 0.5, 0.5], [1.0, 0.5, 0.3], [0.0, 0.0, 0.2]], np.float32)
    np.testing.assert_allclose(disagreement(p, q), [1.0, 0.0, 0.3], atol=1e-7)
    assert disagreement(p, q).dtype == np.float32


def test_the_mirror_axis_is_the_patients_left_right_axis():
    image = sitk.Image([5, 6, 7], sitk.sitkUInt8)
    for direction, axis in ((oblique_direction(30), 2), (ROWS_LEFT_RIGHT, 1), (tuple(np.diag([-1.0, 1, 1]).ravel()), 2)):
        image.SetDirection(direction)
        assert mirror_axis(image) == axis
    image.SetDirection(SAGITTAL)
    assert mirror_axis(image, spatial_dims=3) == 0
    with pytest.raises(GeometryError, match="sagittal slices.*without the uncertainty map"):
        mirror_axis(image, spatial_dims=2)
    case, _ = case_with(SAGITTAL)
    with pytest.raises(GeometryError, match="left-right"):
        InferenceEngine(build_method("unet2d"), "cpu").segment(case, mirror_tta=True)


def test_network_boxes_mirror_like_the_pixels_they_cover():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 61.0]])
    for dim, expected in ((3, [206.0, 20.0, 246.0, 61.0]), (2, [10.0, 195.0, 50.0, 236.0])):
        mirrored = mirror_network_box(boxes, dim, 256)
        assert mirrored.tolist() == [expected]
        mask = torch.zeros(256, 256)
        mask[20:61, 10:50] = 1
        x0, y0, x1, y1 = (int(v) for v in expected)
        mirrored_mask = torch.zeros(256, 256)
        mirrored_mask[y0:y1, x0:x1] = 1
        assert torch.equal(mask.flip(dim - 2), mirrored_mask)


def symmetric_boxed_conv():
    torch.manual_seed(0)
    method = BoxedConv().eval()
    with torch.no_grad():  # a kernel symmetric left-right: the whole method commutes with the mirror
        method.encoder.weight.copy_(0.5 * (method.encoder.weight + method.encoder.weight.flip(-1)))
    return method


def test_a_box_prompt_is_mirrored_with_the_image(monkeypatch):
    images, _ = blob_case((12, 40, 40))
    case = prepare_case({"flair": images["flair"]})
    box = Box(5, 5, 2, 30, 30, 7)  # off the centre: an unmirrored box would cover other columns
    method = symmetric_boxed_conv()
    cached = InferenceEngine(method, "cpu", batch_size=4, embedding_cache=EmbeddingCache())
    result = cached.segment(case, box=box, mirror_tta=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.uncertainty), 0.0, atol=1e-5)
    plain = InferenceEngine(method, "cpu", batch_size=4).segment(case, box=box)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), sitk.GetArrayFromImage(plain.labels))
    slices = len(set(case.brain_slices().tolist()) & set(range(2, 8)))
    assert len(cached.embedding_cache) == 2 * slices  # the mirrored slices' embeddings are their own entries
    before = method.encoded_slices
    again = cached.segment(case, box=box, mirror_tta=True)
    assert method.encoded_slices == before  # ... reused by the next box
    np.testing.assert_array_equal(sitk.GetArrayFromImage(again.uncertainty), sitk.GetArrayFromImage(result.uncertainty))

    # The check has teeth: with the box left unmirrored the two passes disagree along its edges.
    monkeypatch.setattr(engine_module, "mirror_network_box", lambda boxes, dim, size: boxes)
    unmirrored = InferenceEngine(method, "cpu", batch_size=4).segment(case, box=box, mirror_tta=True)
    assert sitk.GetArrayFromImage(unmirrored.uncertainty).max() > 0.5


def test_3d_patch_path_mirrors_along_the_left_right_axis():
    torch.manual_seed(0)
    method = FlairOnly3D().eval()
    direction = oblique_direction(10)
    images, labels = blob_case((16, 32, 32), spacing=(1.0, 1.0, 2.0), direction=direction)
    case = prepare_case({"flair": images["flair"]})
    result = InferenceEngine(method, "cpu", min_component_ml=0, min_component_confidence=0).segment(case, mirror_tta=True, return_probabilities=True)
    flip = 2 + (2 - int(np.argmax(np.abs(np.reshape(direction, (3, 3))[0]))))  # dim of [B, C, D, H, W]
    volume, available = torch.as_tensor(case.images[None]), torch.as_tensor(case.available[None])
    with torch.no_grad():  # the case is one window: the sliding window is the network on the volume
        plain = method.predict_proba(volume, available)[0].numpy()
        mirrored = method.predict_proba(volume.flip(flip), available).flip(flip)[0].numpy()
    expected = np.where(case.brain_mask, 0.5 * np.abs(plain - mirrored).sum(0), 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.uncertainty), expected, atol=1e-5)
    assert expected.max() > 0.01
    probabilities = np.moveaxis(sitk.GetArrayFromImage(result.probabilities), -1, 0)
    np.testing.assert_allclose(probabilities[:, case.brain_mask], (0.5 * (plain + mirrored))[:, case.brain_mask],
                               atol=1e-5)
    assert result.uncertainty.GetDirection() == labels.GetDirection()


def test_the_pipeline_passes_it_through():
    images, _ = blob_case((8, 40, 40))
    method = build_method("unet2d")
    assert segment_images(images, method, device="cpu").result.uncertainty is None
    result = segment_images(images, method, device="cpu", mirror_tta=True).result
    assert result.uncertainty.GetSize() == images["t1ce"].GetSize()
