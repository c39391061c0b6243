"""Thread sweep (issue 22): the CPU's hot operators at each intra-op / inter-op thread setting.

    python benchmarks/bench_threads.py [--settings 1,1 2,1 2,2 1,2]

One child process per setting (PyTorch takes the inter-op count only before a process's first
parallel work), the same inputs in each: LiteMedSAM's TinyViT (real weights) on PyTorch fp32 and on
OpenVINO f32 (``backbones.openvino_encoder``; skipped without the package), SAM's mask decoder
with one box, and unet2d on a batch of 8 slices of 256 x 256. Prints seconds per call, the best
of 3 (5 for the decoder). Run it on idle cores: the figures are only comparable within one run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, sys, time
sys.path.insert(0, sys.argv[3])
import torch
torch.set_num_threads(int(sys.argv[1]))
torch.set_num_interop_threads(int(sys.argv[2]))
from BrainLesionSAMLib.backbones.litemedsam import build_lite_medsam
from BrainLesionSAMLib.backbones.openvino_encoder import OpenVINOEncoder, openvino_installed
from BrainLesionSAMLib.methods.unet2d import UNet2DBaseline

def best(call, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)

torch.manual_seed(0)
backbone, unet = build_lite_medsam(pretrained=True).eval(), UNet2DBaseline().eval()
image, slices = torch.randn(1, 3, 256, 256), torch.randn(8, 4, 256, 256)
box, available = torch.tensor([[60.0, 60.0, 180.0, 180.0]]), torch.ones(8, 4, dtype=torch.bool)
out = {}
with torch.inference_mode():
    embedding = backbone.torch_encode(image)
    out["TinyViT torch fp32 s"] = best(lambda: backbone.torch_encode(image))
    if openvino_installed():
        encoder = OpenVINOEncoder(backbone, "fp32", threads=torch.get_num_threads())
        encoder(image)  # converts (once per weights) and compiles here, not in the timing
        out["TinyViT OpenVINO f32 s"] = best(lambda: encoder(image))
    out["SAM mask decoder s"] = best(lambda: backbone.decode(embedding, box), 5)
    out["unet2d batch 8 s"] = best(lambda: unet(slices, available))
print(json.dumps(out))
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["1,1", "2,1", "2,2", "1,2"], metavar="INTRA,INTER")
    args = parser.parse_args(argv)
    for setting in args.settings:
        intra, inter = (int(v) for v in setting.split(","))
        done = subprocess.run([sys.executable, "-c", CHILD, str(intra), str(inter), str(REPO)],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            print(f"intra {intra}, inter {inter}: failed\n{done.stderr[-2000:]}")
            return 1
        figures = json.loads(lines[-1])
        print(f"intra {intra}, inter {inter}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
