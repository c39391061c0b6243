"""The inference engine against an independent slice-by-slice reference, on awkward geometry."""
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.networks.nets import UNet

from BrainLesionSAMLib.engine import Box, InferenceEngine, default_batch_size, resolve_device
from BrainLesionSAMLib.errors import BrainLesionSAMError, CancelledError, GeometryError, MissingModalityError
from BrainLesionSAMLib.methods import MethodFacts, SegmentationMethod, build_method
from BrainLesionSAMLib.preprocessing import prepare_case

from conftest import blob_case, make_image, oblique_direction


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_method("unet2d").eval()


@pytest.fixture(scope="module")
def oblique_case():
    images, labels = blob_case((11, 61, 47), spacing=(0.9, 1.1, 3.0), origin=(10.0, -20.0, 5.0),
                               direction=oblique_direction(30))
    return prepare_case(images), labels


def naive_reference(model, case):
    """One slice at a time, written independently of the engine's batching and bookkeeping."""
    lookup = np.array(model.facts.labels)
    out = np.zeros(case.shape_zyx, np.uint8)
    available = torch.as_tensor(case.available)[None]
    geometry = case.slice_geometry
    for z in range(case.shape_zyx[0]):
        if not case.brain_mask[z].any():
            continue
        with torch.no_grad():
            probabilities = model.predict_proba(case.network_slices([z]), available)
        classes = geometry.from_network(probabilities).argmax(1)[0].numpy()
        out[z] = lookup[classes]
    out[~case.brain_mask] = 0
    return out


def test_engine_matches_naive_loop_and_keeps_geometry(model, oblique_case):
    case, labels = oblique_case
    result = InferenceEngine(model, device="cpu", batch_size=4).segment(case)
    output = result.labels
    assert output.GetSize() == labels.GetSize()
    assert output.GetSpacing() == labels.GetSpacing()
    assert output.GetOrigin() == labels.GetOrigin()
    assert output.GetDirection() == labels.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(output), naive_reference(model, case))


def test_engine_is_deterministic_and_batch_size_independent(model, oblique_case):
    case, _ = oblique_case
    first = sitk.GetArrayFromImage(InferenceEngine(model, "cpu", batch_size=3).segment(case).labels)
    second = sitk.GetArrayFromImage(InferenceEngine(model, "cpu", batch_size=8).segment(case).labels)
    np.testing.assert_array_equal(first, second)


def test_default_batch_size_is_one_slice_on_the_cpu_and_eight_on_a_gpu(model):
    # On the CPU batching only costs time (docs/benchmarks.md); on a GPU it fills the device.
    assert InferenceEngine(model, "cpu").batch_size == 1
    assert InferenceEngine(model, "cpu", batch_size=5).batch_size == 5
    assert default_batch_size(torch.device("cuda")) == 8
    with pytest.raises(BrainLesionSAMError, match="at least 1"):
        InferenceEngine(model, "cpu", batch_size=0)


def test_probabilities_sum_to_one_and_agree_with_labels(model, oblique_case):
    case, _ = oblique_case
    result = InferenceEngine(model, "cpu").segment(case, return_probabilities=True)
    probabilities = sitk.GetArrayFromImage(result.probabilities)  # [Z, Y, X, K]
    assert probabilities.shape == case.shape_zyx + (4,)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=1e-5)
    lookup = np.array(model.facts.labels)
    np.testing.assert_array_equal(lookup[probabilities.argmax(-1)], sitk.GetArrayFromImage(result.labels))


def test_box_restricts_output_and_slices(model, oblique_case):
    case, _ = oblique_case
    box = Box(5, 10, 2, 30, 40, 6)
    labels = sitk.GetArrayFromImage(InferenceEngine(model, "cpu").segment(case, box=box).labels)
    outside = ~box.mask(case.shape_zyx)
    assert not labels[outside].any()
    with pytest.raises(GeometryError):
        InferenceEngine(model, "cpu").segment(case, box=Box(500, 500, 500, 600, 600, 600))


def test_box_parsing():
    assert Box.parse("1,2,3,4,5,6") == Box(1, 2, 3, 4, 5, 6)
    with pytest.raises(GeometryError):
        Box.parse("1,2,3")


def test_progress_and_cancel(model, oblique_case):
    case, _ = oblique_case
    seen = []
    InferenceEngine(model, "cpu", batch_size=2).segment(case, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > 3
    calls = []

    def cancel_after_two_batches():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(CancelledError):
        InferenceEngine(model, "cpu", batch_size=2).segment(case, cancel=cancel_after_two_batches)


def test_device_choice():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BrainLesionSAMError, match="no CUDA"):
            resolve_device("cuda")


class FlairOnly3D(SegmentationMethod):
    """A 3D method for the patch path (not registered): a small MONAI 3D U-Net needing FLAIR."""

    facts = MethodFacts(name="test3d", title="test", modalities=("flair",), required_modalities=("flair",),
                        spatial_dims=3, label_set="lesion", promptable=False, cacheable_embeddings=False,
                        input_size=(16, 32, 32))
    default_config = {}

    def __init__(self):
        super().__init__()
        self.net = UNet(3, 4, 2, channels=(4, 8), strides=(2,), num_res_units=0)

    def forward(self, images, available, boxes=None):
        return self.net(images / 255.0)


def test_3d_patch_path_matches_a_single_window():
    torch.manual_seed(0)
    method = FlairOnly3D().eval()
    images, labels = blob_case((16, 32, 32), spacing=(1.0, 1.0, 2.0), direction=oblique_direction(10))
    case = prepare_case({"flair": images["flair"]})
    # No clean-up: the expectation below is the network alone (it once matched only because the engine
    # shrank case.brain_mask in place, see test_segmenting_leaves_the_prepared_case_unchanged).
    result = InferenceEngine(method, "cpu", min_component_ml=0, min_component_confidence=0).segment(case, return_probabilities=True)
    with torch.no_grad():
        direct = method.predict_proba(torch.as_tensor(case.images[None]), torch.as_tensor(case.available[None]))
    expected = np.where(case.brain_mask, direct[0].argmax(0).numpy(), 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.labels), expected)
    assert result.labels.GetDirection() == labels.GetDirection()
    with pytest.raises(MissingModalityError, match="FLAIR"):
        InferenceEngine(method, "cpu").segment(prepare_case({"t1": images["t1"]}))


class BoxedConv(SegmentationMethod):
    """A cacheable, promptable 2D method (not registered): conv encoder, decoder masked by the box."""

    facts = MethodFacts(name="testboxed", title="test", modalities=("flair",), required_modalities=("flair",),
                        spatial_dims=2, label_set="lesion", promptable=True, cacheable_embeddings=True,
                        input_size=(256, 256))
    default_config = {}

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.decoder = torch.nn.Conv2d(4, 2, 1)
        self.encoded_slices = 0

    def encode(self, images, available):
        self.encoded_slices += len(images)
        return torch.relu(self.encoder(images[:, 3:4] / 255.0))

    def decode_proba(self, embeddings, available, boxes=None):
        logits = self.decoder(embeddings)
        inside = torch.zeros_like(logits[:, :1], dtype=torch.bool)
        for b, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            inside[b, :, y0:y1, x0:x1] = True
        return torch.softmax(torch.where(inside, logits, torch.tensor([[10.0], [-10.0]]).view(1, 2, 1, 1)), 1)

    def forward(self, images, available, boxes=None):
        return torch.log(self.decode_proba(self.encode(images, available), available, boxes))


def test_embedding_cache_reencodes_only_new_slices_and_changes_nothing():
    from BrainLesionSAMLib.engine import EmbeddingCache

    torch.manual_seed(0)
    method = BoxedConv().eval()
    images, _ = blob_case((12, 40, 40))
    case = prepare_case({"flair": images["flair"]})
    cached = InferenceEngine(method, "cpu", batch_size=4, embedding_cache=EmbeddingCache())
    plain = InferenceEngine(method, "cpu", batch_size=4)
    first, second = Box(5, 5, 2, 30, 30, 7), Box(10, 8, 4, 35, 36, 9)
    runs = []
    for box in (first, second):
        before = method.encoded_slices
        labels = sitk.GetArrayFromImage(cached.segment(case, box=box).labels)
        runs.append(method.encoded_slices - before)
        np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(plain.segment(case, box=box).labels))
    brain = set(case.brain_slices().tolist())
    assert runs[0] == len(brain & set(range(2, 8)))
    assert runs[1] == len(brain & set(range(8, 10)))  # slices 4-7 come from the cache
    assert len(cached.embedding_cache) == len(brain & set(range(2, 10)))


def test_segmenting_leaves_the_prepared_case_unchanged(model, oblique_case):
    # The Slicer logic and the web page keep one PreparedCase for every Segment and Refine.
    case, _ = oblique_case
    mask, images = case.brain_mask.copy(), case.images.copy()
    engine = InferenceEngine(model, "cpu", min_component_ml=50)  # the clean-up removes components here
    first = engine.segment(case, return_probabilities=True)
    assert np.array_equal(case.brain_mask, mask) and np.array_equal(case.images, images)
    second = engine.segment(case, return_probabilities=True)
    for a, b in ((first.labels, second.labels), (first.probabilities, second.probabilities)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_cascade_runs_the_method_only_near_the_cascade_models_lesion_slices():
    """The cascade's slices are where the first model labels a lesion +- the margin; the method's
    result there equals its plain run, and every other slice is background."""
    from BrainLesionSAMLib.engine import EmbeddingCache

    torch.manual_seed(0)
    images, _ = blob_case((14, 40, 40))
    case = prepare_case({"flair": images["flair"]})

    class Counting(BoxedConv):
        def decode_proba(self, embeddings, available, boxes=None):  # automatic: no box, lesion everywhere
            self.decoded = getattr(self, "decoded", 0) + len(embeddings)
            whole = torch.tensor([[0.0, 0.0, 256.0, 256.0]]).expand(len(embeddings), 4)
            return super().decode_proba(embeddings, available, whole)

    class FirstModel(SegmentationMethod):  # labels a lesion on the slices in ``where`` only
        facts = MethodFacts(name="testfirst", title="test", modalities=("flair",), required_modalities=("flair",),
                            spatial_dims=2, label_set="lesion", promptable=False, cacheable_embeddings=False,
                            input_size=(256, 256))
        default_config = {}

        def forward(self, images, available, boxes=None):
            raise AssertionError("predict_proba is used")

        def predict_proba(self, images, available, boxes=None):
            probabilities = torch.zeros(len(images), 2, 256, 256)
            probabilities[:, 0] = 1.0
            probabilities[:, :, 100:160, 100:160] = torch.tensor([0.0, 1.0])[:, None, None]
            return probabilities

    first = FirstModel().eval()
    cascade = InferenceEngine(first, "cpu", min_component_ml=0, min_component_confidence=0)
    method = Counting().eval()
    engine = InferenceEngine(method, "cpu", cascade=cascade, cascade_margin=1, min_component_ml=0, min_component_confidence=0,
                             embedding_cache=EmbeddingCache())
    chosen = engine.cascade_slices(case)
    first_found = np.flatnonzero(sitk.GetArrayFromImage(cascade.segment(case).labels).any(axis=(1, 2)))
    assert len(first_found) and set(chosen) == {z for f in first_found for z in (f - 1, f, f + 1)
                                                if 0 <= z < case.shape_zyx[0]}
    labels = sitk.GetArrayFromImage(engine.segment(case).labels)
    plain = sitk.GetArrayFromImage(InferenceEngine(method, "cpu", min_component_ml=0, min_component_confidence=0).segment(case).labels)
    ran = sorted(set(chosen) & set(case.brain_slices().tolist()))
    np.testing.assert_array_equal(labels[ran], plain[ran])
    others = [z for z in range(case.shape_zyx[0]) if z not in ran]
    assert not labels[others].any()
    assert method.encoded_slices == len(ran) + len(case.brain_slices())  # cascade run + plain run
    with pytest.raises(BrainLesionSAMError, match="both its model and the method must be 2D"):
        InferenceEngine(method, "cpu", cascade=InferenceEngine(FlairOnly3D(), "cpu"))


def test_engine_gives_a_2p5d_method_each_slices_neighbours(oblique_case):
    """A 2.5D unet2d (context_slices 1) through the engine gives the probabilities of a loop that
    stacks slices z-1, z, z+1 by hand (clipped at the volume's ends), one slice at a time."""
    case, _ = oblique_case
    torch.manual_seed(3)
    model = build_method("unet2d", {"channels": (8, 16, 32), "strides": (2, 2), "context_slices": 1}).eval()
    assert model.facts.context_slices == 1 and type(model).facts.context_slices == 0
    depth = case.shape_zyx[0]
    available = torch.as_tensor(case.available)[None]
    expected = np.zeros(case.shape_zyx + (len(model.facts.labels),), np.float32)
    expected[..., 0] = 1.0
    for z in range(depth):
        if not case.brain_mask[z].any():
            continue
        stacked = torch.cat([case.network_slices([min(max(z + o, 0), depth - 1)]) for o in (-1, 0, 1)], dim=1)
        with torch.no_grad():
            probabilities = case.slice_geometry.from_network(model.predict_proba(stacked, available))[0]
        expected[z] = probabilities.permute(1, 2, 0).numpy()
    result = InferenceEngine(model, "cpu", batch_size=4, min_component_ml=0, min_component_confidence=0, precision="fp32").segment(
        case, return_probabilities=True)
    inside = case.brain_mask
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.probabilities)[inside], expected[inside], atol=1e-5)


class TwoLesions(SegmentationMethod):
    """Labels two square lesions on every slice: one the network is sure of (p 0.9), one it is not (p 0.6)."""
    facts = MethodFacts(name="testtwolesions", title="test", modalities=("flair",), required_modalities=("flair",),
                        spatial_dims=2, label_set="lesion", promptable=False, cacheable_embeddings=False,
                        input_size=(256, 256))

    def forward(self, images, available, boxes=None):
        lesion = torch.full(images.shape[:1] + images.shape[-2:], -10.0)
        lesion[:, 88:128, 88:128] = math.log(0.9 / 0.1)      # a 100 x 100 slice sits at 78-178
        lesion[:, 148:168, 148:168] = math.log(0.6 / 0.4)
        return torch.stack([torch.zeros_like(lesion), lesion], dim=1)


def test_engine_drops_unconfident_components_of_automatic_results_only():
    """min_component_confidence drops a whole-lesion component whose mean lesion probability is below
    it, after the size clean-up, in automatic runs only; a boxed result is the network's."""
    flair = np.random.default_rng(0).uniform(10, 20, (6, 100, 100)).astype(np.float32)
    flair[:, 95:] = 1.0  # the darkest 5 %: what the percentile clip sends to 0, so brain is everywhere else
    case = prepare_case({"flair": make_image(flair)})
    method = TwoLesions().eval()
    plain = sitk.GetArrayFromImage(InferenceEngine(method, "cpu", min_component_ml=0, min_component_confidence=0).segment(case).labels)
    assert plain[:, 12:48, 12:48].all() and plain[:, 72:88, 72:88].all()  # both lesions, every slice
    for confidence, expected_sure, expected_unsure in ((0.55, True, True), (0.75, True, False), (0.95, False, False)):
        engine = InferenceEngine(method, "cpu", min_component_confidence=confidence)
        labels = sitk.GetArrayFromImage(engine.segment(case).labels)
        assert labels[:, 12:48, 12:48].all() == expected_sure and labels[:, 72:88, 72:88].any() == expected_unsure
        assert not labels[:, 72:88, 72:88].any() or labels[:, 72:88, 72:88].all()  # components go whole
    box = Box(0, 0, 0, 99, 99, 5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(engine.segment(case, box=box).labels), plain)
