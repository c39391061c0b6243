"""The OpenVINO image encoder (issue 22): the same embeddings and the same segmentation as PyTorch's,
converted once per weights and kept, used only where it computes what PyTorch would, and the runtime
choice with its errors. The conversion (about 20 s) happens once in this module."""
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.backbones import openvino_encoder
from BrainLesionSAMLib.backbones.litemedsam import build_lite_medsam
from BrainLesionSAMLib.backbones.openvino_encoder import OpenVINOEncoder, encoder_key, resolve_encoder_runtime
from BrainLesionSAMLib.engine import Box, InferenceEngine
from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.methods.boxprompt import LiteMedSAMMethod
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case
from conftest import REAL_OPENVINO_INSTALLED

pytest.importorskip("openvino", reason="the OpenVINO encoder needs the 'openvino' package (the test extra has it)")


@pytest.fixture(scope="module", autouse=True)
def real_openvino(tmp_path_factory):
    """OpenVINO as a user's process sees it, with the converted models in this module's cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_encoder, "openvino_installed", REAL_OPENVINO_INSTALLED)
        patch.setenv("BRAINLESIONSAM_CACHE", str(tmp_path_factory.mktemp("weights-cache")))
        patch.setattr(openvino_encoder, "_compiled", {})
        yield


@pytest.fixture(scope="module")
def case():
    images = generate_case(SampleParameters.random(7, resolution=2))
    truth = sitk.GetArrayFromImage(images.pop("seg")) > 0
    centre = int(truth.sum(axis=(1, 2)).argmax())
    z, y, x = (np.flatnonzero(truth.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    box = Box(int(x[0]), int(y[0]), centre - 1, int(x[-1]), int(y[-1]), centre + 1)
    return prepare_case(images), box


@pytest.fixture(scope="module")
def backbone():
    return build_lite_medsam().eval()


def normalized_slices(case, backbone):
    prepared, box = case
    images = prepared.network_slices(np.arange(box.z0, box.z1 + 1))[:, 3:4]  # FLAIR, [0, 255]
    return backbone.normalize(images.expand(-1, 3, -1, -1).float())


def test_openvino_gives_pytorchs_embeddings(case, backbone):
    x = normalized_slices(case, backbone)
    with torch.inference_mode():
        expected = backbone.torch_encode(x)
    encoder = OpenVINOEncoder(backbone, "fp32", threads=torch.get_num_threads())
    got = encoder(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    # float32 on both sides: the difference is summation order, far below what the decoder resolves
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert float((got - expected).norm() / expected.norm()) < 1e-4
    one = encoder(x[:1])  # another batch size on the same compiled model
    torch.testing.assert_close(one, expected[:1], rtol=1e-3, atol=1e-3)


def test_the_engine_on_openvino_segments_exactly_as_on_pytorch(case):
    prepared, box = case
    method = LiteMedSAMMethod.pretrained()
    results = {}
    for runtime in ("torch", "openvino"):
        messages = []
        engine = InferenceEngine(method, device="cpu", precision="fp32", encoder_runtime=runtime)
        result = engine.segment(prepared, box=box, progress=lambda f, m: messages.append(m))
        assert result.encoder_runtime == runtime
        assert method.net.fast_encoder is None  # attached for the run only
        results[runtime] = sitk.GetArrayFromImage(result.labels)
    assert results["torch"].any()
    np.testing.assert_array_equal(results["openvino"], results["torch"])


def test_the_converted_encoder_is_kept_and_found_again(case, backbone, monkeypatch):
    import openvino

    x = normalized_slices(case, backbone)[:1]
    OpenVINOEncoder(backbone)(x)  # converted (or already there from the tests above)
    folder = openvino_encoder.cache_folder_for_openvino()
    kept = list(folder.glob("lite-*/encoder.xml"))
    assert len(kept) == 1 and kept[0].parent.name == f"lite-{encoder_key(backbone)[:32]}"
    assert not list(folder.glob("*.partial-*"))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the converted model is in the cache folder")

    monkeypatch.setattr(openvino, "convert_model", no_conversion)
    monkeypatch.setattr(openvino_encoder, "_compiled", {})  # as a new process
    with torch.inference_mode():
        expected = backbone.torch_encode(x)
    torch.testing.assert_close(OpenVINOEncoder(backbone)(x), expected, rtol=1e-3, atol=1e-3)


def test_other_weights_get_another_key(backbone):
    other = build_lite_medsam().eval()
    assert encoder_key(other) == encoder_key(backbone)
    first = next(other.image_encoder.parameters())
    original = first.detach().clone()
    with torch.no_grad():
        first.add_(1e-3)
    assert encoder_key(other) != encoder_key(backbone)
    # the decoder is not the encoder: changing it keeps the key (the brain-tuned LiteMedSAM shares it)
    with torch.no_grad():
        next(other.mask_decoder.parameters()).add_(1.0)
        first.copy_(original)
    assert encoder_key(other) == encoder_key(backbone)


def test_the_fast_encoder_runs_only_where_it_computes_the_same(backbone):
    x = torch.rand(1, 3, 256, 256)

    def refuse(normalized):
        raise AssertionError("the fast encoder ran")

    backbone.fast_encoder = refuse
    try:
        with torch.inference_mode():
            hooked = backbone.encode(x, after_block=lambda index, y: y)  # a method's own modules between blocks
            expected = backbone.torch_encode(x)
        torch.testing.assert_close(hooked, expected)
        with torch.enable_grad():
            assert backbone.encode(x).shape == expected.shape  # autograd: training needs PyTorch's
        with torch.inference_mode(), pytest.raises(AssertionError, match="fast encoder ran"):
            backbone.encode(x)
    finally:
        backbone.fast_encoder = None


def test_encoder_runtime_choice_and_its_errors(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_encoder_runtime("auto", cpu) == "openvino"
    assert resolve_encoder_runtime("torch", cpu) == "torch"
    assert resolve_encoder_runtime("auto", cuda) == "torch"
    with pytest.raises(BrainLesionSAMError, match="CPU only.*--encoder-runtime torch"):
        resolve_encoder_runtime("openvino", cuda)
    with pytest.raises(BrainLesionSAMError, match="unknown encoder runtime 'onnx'"):
        resolve_encoder_runtime("onnx", cpu)
    monkeypatch.setattr(openvino_encoder, "openvino_installed", lambda: False)
    assert resolve_encoder_runtime("auto", cpu) == "torch"
    with pytest.raises(BrainLesionSAMError, match="pip install openvino"):
        resolve_encoder_runtime("openvino", cpu)


def test_methods_without_a_sam_backbone_report_torch():
    from BrainLesionSAMLib.catalogue import resolve_method

    engine = InferenceEngine(resolve_method("unet2d"), device="cpu", encoder_runtime="openvino")
    assert engine.encoder_runtime == "torch" and not engine.backbones
