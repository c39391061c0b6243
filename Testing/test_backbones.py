"""The block-by-block backbone interface the 2D methods build on (backbones/base.py)."""
import pytest
import torch

from BrainLesionSAMLib.backbones import BACKBONES, build_backbone
from BrainLesionSAMLib.backbones.litemedsam import build_lite_medsam
from BrainLesionSAMLib.backbones.sam_vit import SamViTB


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    return {"vit_b": SamViTB(256).eval(), "lite": build_lite_medsam(pretrained=True)}


@pytest.mark.parametrize("name", BACKBONES)
def test_block_by_block_equals_the_encoder_and_declares_its_shapes(backbones, name):
    """tokens -> run_block x 12 -> embedding is the encoder's own forward, and every block's output
    has the width and grid the backbone declares (what the methods size their modules by)."""
    backbone = backbones[name]
    torch.manual_seed(1)
    normalized = backbone.normalize(255 * torch.rand(1, 3, 256, 256))
    seen = []

    def record(index, x):
        seen.append(tuple(x.shape))
        return x

    with torch.no_grad():
        reference = backbone.image_encoder(normalized)
        blockwise = backbone.encode(normalized, after_block=record)
    assert torch.equal(blockwise, reference)
    assert blockwise.shape == (1, 256, backbone.embedding_size, backbone.embedding_size)
    assert seen == [(1, g, g, c) for g, c in zip(backbone.block_grids, backbone.block_dims)]
    assert backbone.num_blocks == 12
    expected = {"vit_b": ((768,) * 12, (16,) * 12),
                "lite": ((64, 128, 128, 160, 160, 160, 160, 160, 160, 320, 320, 320),
                         (256, 128, 128) + (64,) * 9)}[name]
    assert (backbone.block_dims, backbone.block_grids) == expected


@pytest.mark.parametrize("name", BACKBONES)
def test_hook_output_replaces_the_block_output(backbones, name):
    backbone = backbones[name]
    normalized = backbone.normalize(255 * torch.rand(1, 3, 256, 256))
    with torch.no_grad():
        plain = backbone.encode(normalized)
        zeroed_last = backbone.encode(normalized, after_block=lambda i, x: x * 0 if i == 11 else x)
        neck_of_zeros = backbone.embedding(torch.zeros(1, backbone.block_grids[-1], backbone.block_grids[-1],
                                                       backbone.block_dims[-1]))
    assert not torch.equal(plain, zeroed_last)
    torch.testing.assert_close(zeroed_last, neck_of_zeros, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
def test_decode_with_and_without_a_box(backbones, name):
    backbone = backbones[name]
    embeddings = torch.randn(2, 256, backbone.embedding_size, backbone.embedding_size)
    boxes = torch.tensor([[10.0, 20.0, 100.0, 120.0], [30.0, 30.0, 200.0, 220.0]])
    with torch.no_grad():
        boxed = backbone.decode(embeddings, boxes)
        unprompted = backbone.decode(embeddings)
        one_by_one = torch.cat([backbone.decode(embeddings[i:i + 1], boxes[i:i + 1]) for i in range(2)])
    size = backbone.low_res_size
    assert boxed.shape == unprompted.shape == (2, 1, size, size)
    assert torch.equal(boxed, one_by_one)  # one box per image, not every box on every image
    assert not torch.equal(boxed, unprompted)
    with pytest.raises(ValueError, match="boxes must be"):
        backbone.decode(embeddings, boxes[:1])


def test_build_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'vit_l'.*vit_b, lite"):
        build_backbone("vit_l")
    with pytest.raises(ValueError, match="'lite' backbone .*256"):
        build_backbone("lite", image_size=512, method="dbsam")
    with pytest.raises(ValueError, match="lite takes images"):
        build_lite_medsam(pretrained=False)(torch.zeros(1, 3, 128, 128))
