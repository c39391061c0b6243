"""The clean-up of automatic results: small whole-lesion components go, everything else stays."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from BrainLesionSAMLib.postprocessing import remove_small_components


def test_small_components_go_labels_of_kept_ones_stay():
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:8, 2:8, 2:8] = 2          # 216 voxels of 2 mm^3 (spacing 1, 1, 2) = 0.432 ml
    labels[4:6, 4:6, 4:6] = 4          # a sub-region inside the big component keeps its label
    labels[15, 20, 20] = 1             # one voxel: 0.002 ml
    labels[15:17, 25:27, 25:27] = 4    # 8 voxels: 0.016 ml
    labels[10, 10, 10] = 2             # diagonal neighbour of nothing: alone
    labels[11, 11, 11] = 2             # 26-connected to the voxel above: one component of 2 voxels
    spacing = (1.0, 1.0, 2.0)
    cleaned = remove_small_components(labels, spacing, min_volume_ml=0.01)
    assert np.array_equal(cleaned[2:8, 2:8, 2:8], labels[2:8, 2:8, 2:8])
    assert cleaned[15, 20, 20] == 0 and cleaned[10, 10, 10] == 0 and cleaned[11, 11, 11] == 0
    assert (cleaned[15:17, 25:27, 25:27] == 4).all()
    # Every voxel is either unchanged or set to 0; a threshold of 0 changes nothing.
    assert np.all((cleaned == labels) | (cleaned == 0))
    assert np.array_equal(remove_small_components(labels, spacing, 0.0), labels)
    assert not remove_small_components(labels, spacing, 1.0).any()


def test_info_json_names_the_default_method():
    out = subprocess.run([sys.executable, "-m", "BrainLesionSAMLib.cli", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    info = json.loads(out)
    assert info["default_method"] in [m["name"] for m in info["methods"]]
    assert next(m for m in info["methods"] if m["name"] == info["default_method"])["promptable"] is False


def test_unconfident_components_go_confident_ones_stay_whole():
    from BrainLesionSAMLib.postprocessing import remove_unconfident_components

    labels = np.zeros((6, 10, 10), np.uint8)
    labels[1:3, 1:4, 1:4] = 2
    labels[2, 2, 2] = 4                      # a confident lesion with two sub-regions
    labels[4:6, 6:9, 6:9] = 1                # an unsure one
    probability = np.zeros(labels.shape)
    probability[labels > 0] = 0.55
    probability[1:3, 1:4, 1:4] = 0.9
    probability[1, 1, 1] = 0.51              # one unsure voxel does not sink a confident component
    kept = remove_unconfident_components(labels, probability, 0.75)
    assert (kept[1:3, 1:4, 1:4] == labels[1:3, 1:4, 1:4]).all() and not kept[4:6].any()
    assert kept.dtype == labels.dtype and labels[4:6].any()  # a copy; the input is untouched
    # the mean decides: 17 voxels at 0.9 and one at 0.51 average 0.878
    assert remove_unconfident_components(labels, probability, 0.88)[1:3].sum() == 0
    assert (remove_unconfident_components(labels, probability, 0.87) == kept).all()
    assert (remove_unconfident_components(labels, probability, 0) == labels).all()
