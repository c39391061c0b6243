"""MoME: parameter counts against one task-specific nnU-Net, and CPU time per case at 2 mm and 1 mm.

    python benchmarks/bench_mome.py [--resolutions 2 1] [--modalities t1 t1ce t2 flair]
                                    [--threads N] [--skip-patch] [--skip-cases]

1. Parameters of the default (paper) config: one expert, which is one task-specific nnU-Net of the
   same config (a DynUNet 1 -> 2 classes, counted separately), the gate, and MoME in all; built on
   the meta device, so no memory is spent.
2. One 128^3 single-modality patch through MoME (five experts + gate) and through one expert alone,
   with the default config on the CPU (``--skip-patch`` leaves it out): the cost of one window.
3. A generated case per resolution through the library's InferenceEngine on the CPU (MONAI sliding
   window, overlap 0.5, Gaussian weighting), with the given modalities (MoME runs once per
   modality): wall time, windows, peak resident memory. The weights are random: this measures time,
   not accuracy. The 1 mm case with four modalities is 18 windows x 4 modalities x 6 networks at
   128^3 - hours on two cores; give ``--modalities flair`` for one modality's share.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from BrainLesionSAMLib.engine import InferenceEngine
from BrainLesionSAMLib.methods.mome import MoME, nnunet_dynunet
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case


def parameter_counts() -> None:
    config = MoME.default_config
    with torch.device("meta"):
        model = MoME()
        nnunet = nnunet_dynunet(1, 2, config["filters"], config["kernel_sizes"], config["strides"],
                                config["deep_supervision_heads"])
    counts = model.parameter_counts()
    single = sum(p.numel() for p in nnunet.parameters())
    experts = len(config["experts"])
    print(f"default config: {experts} experts {config['experts']}, filters {config['filters']}, "
          f"patch {config['patch_size']}")
    print(f"  one task-specific nnU-Net (DynUNet, same config) {single:>13,}")
    print(f"  one expert                                       {counts['per_expert']:>13,}")
    print(f"  gate                                             {counts['gate']:>13,}")
    print(f"  MoME total                                       {counts['total']:>13,} "
          f"= {counts['total'] / single:.2f} nnU-Nets")
    print(f"  nine task-specific nnU-Nets (the paper's nine datasets) {9 * single:,}")


def patch_time() -> None:
    torch.manual_seed(0)
    model = MoME().eval()
    x = torch.rand(1, 1, *model.config["patch_size"])
    with torch.inference_mode():
        start = time.perf_counter()
        model.network(x, scales=1)
        mome = time.perf_counter() - start
        start = time.perf_counter()
        model.network.experts[0](x)
        expert = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"one {tuple(x.shape[2:])} patch, one modality: MoME {mome:.1f} s, one expert (= one nnU-Net) "
          f"{expert:.1f} s, peak RSS {peak_gb:.1f} GB")


def case_time(resolution: int, modalities: list[str]) -> None:
    images = generate_case(SampleParameters.random(5, resolution=resolution))
    case = prepare_case({m: images[m] for m in modalities})
    torch.manual_seed(0)
    method = MoME().eval()
    windows = []
    predict = method.predict_proba

    def counting(patches, available, boxes=None):
        windows.append(len(patches))
        return predict(patches, available, boxes)

    method.predict_proba = counting
    engine = InferenceEngine(method, device="cpu", batch_size=2)
    start = time.perf_counter()
    result = engine.segment(case)
    total = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"{resolution} mm case {case.shape_zyx[::-1]} (x, y, z), modalities {', '.join(modalities)}: "
          f"{total:.1f} s ({result.timings['network_s']:.1f} s network), {sum(windows)} windows of "
          f"{method.facts.input_size}, peak RSS {peak_gb:.1f} GB, gate {result.case_weights.get('gate')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="*", default=[2, 1], choices=[1, 2])
    parser.add_argument("--modalities", nargs="+", default=["t1", "t1ce", "t2", "flair"],
                        choices=["t1", "t1ce", "t2", "flair"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-patch", action="store_true")
    parser.add_argument("--skip-cases", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU threads: {torch.get_num_threads()}")
    parameter_counts()
    if not args.skip_patch:
        patch_time()
    if not args.skip_cases:
        for resolution in args.resolutions:
            case_time(resolution, args.modalities)


if __name__ == "__main__":
    main()
