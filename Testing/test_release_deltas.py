"""Release files of the methods trained on LiteMedSAM (issue 21): a delta checkpoint holds what
training changed plus every tensor the method initialises at random, and loads back to the very
same network, whatever random state the exporting and the loading process are in."""
import pytest
import torch

from BrainLesionSAMLib.backbones.litemedsam import LITE_MEDSAM_SHA256
from BrainLesionSAMLib.checkpoints import load_method, read_header, save_delta_checkpoint
from BrainLesionSAMLib.methods import build_method

RELEASE_CONFIGS = {
    "dbsam": {"backbone": "lite", "image_size": 128},
    "brainsegdmif": {"backbone": "lite", "image_size": 128, "shared_encoder": True, "freeze_encoders": True},
}


@pytest.mark.parametrize("name", sorted(RELEASE_CONFIGS))
def test_delta_keeps_untrained_random_tensors_and_loads_back_identical(name, tmp_path):
    torch.manual_seed(0)
    model = build_method(name, RELEASE_CONFIGS[name]).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        trainable[-1].add_(0.01)   # "training" touched one tensor; the other random ones kept their init
    # The exporting process in the very random state the model was built in: a base built from it
    # repeats the model's random tensors, which a plain comparison with the base would leave out.
    torch.manual_seed(0)
    path = save_delta_checkpoint(model, tmp_path / f"{name}.safetensors", training_data="unit test")
    assert read_header(path)["base"]["sha256"] == LITE_MEDSAM_SHA256
    torch.manual_seed(123)        # the loading process: yet another random state
    loaded = load_method(name, path)
    own = model.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(own[key], tensor), key
    encoder = sum(t.numel() for k, t in own.items() if ".image_encoder." in k or k.startswith("image_encoder."))
    assert encoder > 0 and path.stat().st_size < 4 * (sum(t.numel() for t in own.values()) - encoder) + 1e6
