"""The ``brainlesionsam`` command line.

Every subcommand prints a clear message and exits with status 1 on a user error (a
BrainLesionSAMError, or a file that cannot be read or written), 2 on bad arguments (argparse), 130
when interrupted. Progress goes to stderr (``progress.ConsoleProgress``: a bar on a terminal, a line
per stage or per 10 % in a log), warnings about the input too (one ``warning: ...`` line each);
results (paths, figures) go to stdout.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from . import __version__
from .conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from .backbones.openvino_encoder import ENCODER_RUNTIMES
from .engine import PRECISIONS, Box, resolve_device
from .errors import BrainLesionSAMError, InputWarning, OutputPathError
from .io import (IMAGE_SUFFIXES, atomic_output, check_output_folder, check_writable, discover_case, make_output_folder,
                 write_image)
from .methods import DEFAULT_METHOD
from .progress import ConsoleProgress

DEMO_MARKER = ".brainlesionsam-demo"
# Volumes of floats (probabilities, the uncertainty map): formats SimpleITK writes them to (no DICOM).
MAP_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")
MAP_OPTIONS = ("probabilities", "uncertainty")  # options naming such a volume; SegmentationResult fields


def _output_path(path: Path, overwrite: bool, option: str = "--out") -> Path:
    check_writable(path)  # a folder given as the file, a missing or read-only folder: said first
    if path.exists() and not overwrite:
        raise OutputPathError(f"{path} already exists; choose another {option} or add --overwrite")
    return path


def _map_outputs(args) -> dict[str, Path]:
    """{'probabilities' / 'uncertainty': path} of the extra volumes asked for, each checked before
    anything is computed: an image suffix, a writable place, no existing file without --overwrite."""
    paths = {}
    for name in MAP_OPTIONS:
        path = getattr(args, name, None)
        if path is None:
            continue
        if not path.name.lower().endswith(MAP_SUFFIXES):
            raise OutputPathError(f"--{name} {path.name}: name the volume .nii.gz (NIfTI; "
                                  f"{', '.join(MAP_SUFFIXES[1:])} work too)")
        paths[name] = _output_path(path, getattr(args, "overwrite", False), f"--{name}")
    return paths


def _segment_one(inputs: dict, method, args, out: Path, report_dir: Path | None, case_id: str,
                 quiet: bool = False) -> dict:
    from .pipeline import segment_images, write_labels

    progress = ConsoleProgress(case_id, disable=quiet)
    try:
        box = Box.parse(args.box) if getattr(args, "box", None) else None
        maps = _map_outputs(args)
        segmentation = segment_images(inputs, method, device=args.device, box=box, progress=progress,
                                      batch_size=args.batch_size, return_probabilities="probabilities" in maps,
                                      mirror_tta="uncertainty" in maps, precision=args.precision,
                                      cascade=getattr(args, "cascade", False),
                                      encoder_runtime=getattr(args, "encoder_runtime", "auto"))
    finally:
        progress.close()
    for name, path in maps.items():  # before the labels: in a batch, the label file says the case is done
        write_image(getattr(segmentation.result, name), path)
    if getattr(args, "output_format", None) == "dicom-seg":  # on the reference DICOM series, referencing it
        from .dicom_seg import write_dicom_seg
        write_dicom_seg(segmentation.result.labels, segmentation.result.label_set,
                        inputs[segmentation.case.reference_modality], out, method.facts.name)
    else:
        write_labels(segmentation.result, out, args.label_convention)
    summary = {"case": case_id, "output": str(out), **{name: str(path) for name, path in maps.items()},
               "method": method.facts.name, "device": segmentation.result.device,
               "precision": segmentation.result.precision, "encoder_runtime": segmentation.result.encoder_runtime,
               **{k: round(v, 3) for k, v in segmentation.timings.items()}}
    if segmentation.result.case_weights:
        # Which modality (or expert) each sub-region relied on: SOFA's attention, MoME's gate.
        summary["modality_weights"] = segmentation.result.case_weights
    if report_dir is not None:
        from .report import lesion_volumes, write_report

        make_output_folder(report_dir)
        case = segmentation.case
        images = {m: case.images[MODALITIES.index(m)] for m in case.modalities}
        labels = segmentation.label_array
        paths = write_report(report_dir, images, labels, case.spacing_zyx, label_set=segmentation.result.label_set,
                             case_id=case_id, direction=case.reference.GetDirection(), extra={**summary, "inputs": {k: str(v) for k, v in inputs.items()}})
        summary["report"] = {k: str(v) for k, v in paths.items()}
        summary["volumes_ml"] = lesion_volumes(labels, case.spacing_zyx, segmentation.result.label_set)
    return summary


def _load(args):
    from .catalogue import resolve_method
    return resolve_method(args.method, args.weights)


def command_segment(args) -> int:
    from .pipeline import case_inputs

    files = {m: getattr(args, m) for m in MODALITIES}
    if args.case_dir is None and not any(files.values()):
        raise BrainLesionSAMError("no input: give --case-dir DIR or the volumes with --t1/--t1ce/--t2/--flair")
    inputs = case_inputs(args.case_dir, files)
    from .dicom_seg import output_format, source_series
    args.output_format = output_format(args.out, args.format)
    out = _output_path(args.out, args.overwrite)
    if args.report is not None:
        check_output_folder(args.report)
    method = _load(args)
    method.facts.check_modalities(list(inputs))
    if args.output_format == "dicom-seg":
        source_series(inputs, method.facts.modalities)  # a NIfTI reference fails here, before segmenting
    case_id = args.case_dir.name if args.case_dir else out.name.split(".")[0]
    summary = _segment_one(inputs, method, args, out, args.report, case_id)
    for region, weights in summary.get("modality_weights", {}).items():
        print(f"{region} relied on: " + ", ".join(f"{MODALITY_DISPLAY_NAMES.get(m, m)} {w:.2f}"
                                                  for m, w in sorted(weights.items(), key=lambda kv: -kv[1])))
    print(f"wrote {out}")
    for name in MAP_OPTIONS:
        if name in summary:
            print(f"wrote {summary[name]}")
    if "report" in summary:
        for path in summary["report"].values():
            print(f"wrote {path}")
    return 0


def _case_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise BrainLesionSAMError(f"input folder {root} does not exist")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def command_batch(args) -> int:
    from .pipeline import case_inputs

    folders = _case_folders(args.input)
    if not folders:
        raise BrainLesionSAMError(f"no case folders in {args.input}; each case is a sub-folder with its volumes")
    method = _load(args)
    if args.output.exists() and not args.output.is_dir():
        raise OutputPathError(f"--output {args.output} is a file; give a folder for the results")
    make_output_folder(args.output)
    check_writable(args.output / "summary.csv")
    args.output_format = args.format
    rows = []
    for index, folder in enumerate(folders, 1):
        out = args.output / (f"{folder.name}.dcm" if args.format == "dicom-seg" else f"{folder.name}.nii.gz")
        row = {"case": folder.name, "status": "", "seconds": "", "output": str(out), "error": ""}
        if out.exists():
            row["status"] = "skipped (already done)"
            rows.append(row)
            print(f"[{index}/{len(folders)}] {folder.name}: already done, skipped")
            continue
        start = time.perf_counter()
        try:
            inputs = case_inputs(folder)
            method.facts.check_modalities(list(inputs))
            if args.format == "dicom-seg":
                from .dicom_seg import source_series
                source_series(inputs, method.facts.modalities)
            report_dir = args.output / "reports" if args.report else None
            # A case whose labels are missing is not done: its own uncertainty file is replaced.
            uncertainty = args.output / f"{folder.name}_uncertainty.nii.gz" if args.uncertainty else None
            case_args = argparse.Namespace(**{**vars(args), "uncertainty": uncertainty, "overwrite": True})
            _segment_one(inputs, method, case_args, out, report_dir, folder.name)
            row["status"] = "done"
        except Exception as error:  # one failing case must not stop the others
            row["status"] = "failed"
            row["error"] = str(error) if isinstance(error, BrainLesionSAMError) else f"{type(error).__name__}: {error}"
        row["seconds"] = f"{time.perf_counter() - start:.1f}"
        rows.append(row)
        print(f"[{index}/{len(folders)}] {folder.name}: {row['status']} {row['error']}".rstrip())
    summary = args.output / "summary.csv"
    with atomic_output(summary) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    failed = sum(r["status"] == "failed" for r in rows)
    print(f"wrote {summary}: {len(rows) - failed} of {len(rows)} cases done or skipped, {failed} failed")
    return 1 if failed else 0


def command_evaluate(args) -> int:
    from .metrics import evaluate_folders

    _output_path(args.out, args.overwrite)
    rows = evaluate_folders(args.pred, args.gt, args.out)
    mean = next((r for r in rows if r.get("case") == "mean"), None)
    if mean is not None:
        shown = {k: v for k, v in mean.items() if k.endswith("dice")}
        print("mean " + "  ".join(f"{k}={float(v):.4f}" for k, v in shown.items()))
    print(f"wrote {args.out}")
    return 0


def parameter_counts(name: str, config: dict | None = None) -> dict[str, int]:
    """Total and trainable parameters of a method as configured, without allocating its weights
    where possible (built on the meta device: BrainSegDMIF's four ViT-B streams would need GBs)."""
    import warnings

    import torch
    from .methods import build_method

    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading initial weights into meta tensors is a no-op
            return build_method(name, config).parameter_counts()
    except (RuntimeError, NotImplementedError):  # code that reads tensor values while building
        return build_method(name, config).parameter_counts()


def gather_info() -> dict:
    import torch
    from .backbones.base import BACKBONES
    from .methods import get_method_class, method_names

    from .catalogue import load_catalogue

    catalogue = load_catalogue()
    methods = []
    for name in method_names():
        cls = get_method_class(name)
        entry = cls.facts.as_dict()
        entry["parameters"] = parameter_counts(name)
        if "backbone" in cls.default_config:
            entry["parameters_by_backbone"] = {backbone: parameter_counts(name, {"backbone": backbone})
                                               for backbone in BACKBONES}
        entry["default_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in cls.default_config.items()}
        entry["packaged_weights"] = cls.packaged_weights
        # What ships: the method's catalogue models, its default first (--weights takes any of the ids).
        entry["weights"] = [{"id": model.id, "title": model.title, "default": model is catalogue.default_for(name),
                             "source": model.kind, "size_mb": round(model.size_mb, 1),
                             "experimental": model.experimental,
                             **({"training": model.training} if model.training else {})}
                            for model in catalogue.for_method(name)]
        methods.append(entry)
    devices = [{"name": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": f"cuda:{i}", "gpu": torch.cuda.get_device_name(i),
                            "free_memory_gb": round(free / 2**30, 2), "total_memory_gb": round(total / 2**30, 2)})
    versions = {"brainlesionsam": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for package in ("torchvision", "monai", "SimpleITK", "numpy", "segment_anything", "safetensors"):
        try:
            module = __import__(package)
            versions[package] = getattr(module, "__version__", getattr(module, "Version", lambda: "?")())
        except ImportError:
            versions[package] = None
    return {"default_method": DEFAULT_METHOD, "methods": methods, "devices": devices, "versions": versions}


def command_info(args) -> int:
    info = gather_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"BrainLesionSAM {info['versions']['brainlesionsam']} (torch {info['versions']['torch']}, "
          f"CUDA {info['versions']['cuda'] or 'none'})")
    print("devices: " + ", ".join(d.get("gpu", d["name"]) for d in info["devices"]))
    for m in info["methods"]:
        modalities = ", ".join(MODALITY_DISPLAY_NAMES[k] + ("" if k in m["required_modalities"] else "?")
                               for k in m["modalities"])
        print(f"  {m['name']:10s} {m['title']}\n             {m['spatial_dims']}D, labels {m['label_set']}, "
              f"modalities {modalities} (? = optional), box prompt {'yes' if m['promptable'] else 'no'}, "
              f"parameters {m['parameters']['total']:,} ({m['parameters']['trainable']:,} trainable)")
        if m["weights"]:
            default, others = m["weights"][0], m["weights"][1:]
            print(f"             weights: {default['title']} [{default['id']}, default]"
                  + "".join(f"; {other['title']} [{other['id']}]" for other in others))
        else:
            print("             weights: none ship; segmenting needs --weights FILE")
    return 0


def command_sample(args) -> int:
    from .sample import generate_cases

    check_output_folder(args.out)
    progress = ConsoleProgress("generating")
    try:
        paths = generate_cases(args.out, args.n, args.seed, resolution=args.resolution,
                               label_convention=args.label_convention, progress=progress,
                               overwrite=args.overwrite)
    finally:
        progress.close()
    for path in paths:
        print(f"wrote {path}")
    return 0


def command_demo(args) -> int:
    """Generate the embedded sample case, segment it with the packaged baseline, report, evaluate."""
    from .metrics import evaluate_labels
    from .sample import SAMPLE_CASE_SEED, SampleParameters, generate_case, write_case

    out: Path = args.out
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise OutputPathError(f"{out} exists and holds files that the demo did not write; choose another --out")
    make_output_folder(out)
    (out / DEMO_MARKER).write_text("written by `brainlesionsam demo`; its files are replaced on the next run\n")
    case_id = "BLSAM_sample"
    case_dir = out / "cases" / case_id
    if not case_dir.is_dir():
        print(f"generating the sample case (seed {SAMPLE_CASE_SEED}) from the MNI152 template")
        write_case(generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1)), out / "cases", case_id)
    method = _load(args)
    labels_path = out / f"{case_id}_{args.method}.nii.gz"
    found = discover_case(case_dir)
    inputs = {k: v for k, v in found.items() if k in MODALITIES}
    start = time.perf_counter()
    summary = _segment_one(inputs, method, args, labels_path, out / "report", case_id)
    seconds = time.perf_counter() - start
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path)))
    truth_image = sitk.ReadImage(str(found["seg"]))
    scores = evaluate_labels(prediction, sitk.GetArrayFromImage(truth_image),
                             tuple(reversed(truth_image.GetSpacing())))
    runtime = ", OpenVINO encoder" if summary["encoder_runtime"] == "openvino" else ""
    print(f"segmented {case_id} with {args.method} on {summary['device']} ({summary['precision']}{runtime}) "
          f"in {seconds:.1f} s")
    print("Dice against the generated ground truth: " +
          "  ".join(f"{region}={scores[region]['dice']:.3f}" for region in ("WT", "TC", "ET") if region in scores))
    print(f"wrote {labels_path}")
    for path in summary["report"].values():
        print(f"wrote {path}")
    print(f"demo output folder: {out.resolve()}")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_inference_options(parser: argparse.ArgumentParser, default_method: str | None = None) -> None:
    parser.add_argument("--method", required=default_method is None, default=default_method,
                        help="registered method name (see `brainlesionsam info`)")
    parser.add_argument("--weights", help="a catalogue model id (`brainlesionsam info` lists them, e.g. "
                        "litemedsam-v1 for the zero-shot LiteMedSAM) or a weights file: our .safetensors, or a "
                        "third-party .pth the method reads (e.g. medsam_vit_b.pth for medsam); default: the "
                        "method's default catalogue model")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="network arithmetic: fp32, bf16 (autocast), or auto (default): autocast on a GPU; on "
                             "the CPU bf16 only where the CPU has native bf16 and the method is measured safe "
                             "(`brainlesionsam info`: cpu_bf16), else fp32")
    parser.add_argument("--encoder-runtime", default="auto", choices=ENCODER_RUNTIMES,
                        help="where SAM image encoders (litemedsam, sofa, medsam) run on the CPU: openvino (2-2.5x "
                             "faster, same result; needs `pip install openvino`), torch, or auto (default): "
                             "openvino when installed")
    parser.add_argument("--cascade", action="store_true",
                        help="automatic 2D methods (e.g. sofa): run the default automatic model first and the "
                             "method only on the slices where it finds a lesion, +- 2 slices (several times "
                             "faster; what the first model misses is missed; off by default)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="slices (or patches) per forward pass (default 8 on a GPU, 1 on the CPU)")
    parser.add_argument("--label-convention", default="brats2021", choices=("brats2021", "brats2023"),
                        help="output numbering: ET = 4 (BraTS 2021) or 3 (BraTS 2023)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainlesionsam", description="Multi-modal brain-lesion segmentation "
                                     "with Segment-Anything-based networks.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    segment = sub.add_parser("segment", help="segment one case")
    segment.add_argument("--case-dir", type=Path, help="folder with the case's volumes (found by name)")
    for m in MODALITIES:
        segment.add_argument(f"--{m}", type=Path, help=f"{MODALITY_DISPLAY_NAMES[m]} volume (overrides --case-dir)")
    _add_inference_options(segment)
    segment.add_argument("--box", help="x0,y0,z0,x1,y1,z1 voxel indices of the reference volume (inclusive)")
    segment.add_argument("--out", type=Path, required=True,
                         help="label volume to write (.nii.gz, .nrrd, ...), or a DICOM SEG (.dcm)")
    segment.add_argument("--format", choices=("image", "dicom-seg"), default=None,
                         help="'image': a label volume; 'dicom-seg': a DICOM Segmentation referencing the input "
                              "DICOM series (the reference volume must be one; --out *.dcm). Default: by --out's suffix")
    segment.add_argument("--report", type=Path, help="folder for the QC picture and lesion volumes (JSON/CSV)")
    segment.add_argument("--probabilities", type=Path,
                         help="also write the class probabilities (one vector component per class)")
    segment.add_argument("--uncertainty", type=Path,
                         help="also write an uncertainty map (.nii.gz, float in [0, 1]): the disagreement of a "
                              "second, left-right mirrored pass (mirror test-time augmentation: labels and "
                              "probabilities become the two passes' mean; about twice the time)")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace --out (and --probabilities, --uncertainty) if they exist")
    segment.set_defaults(handler=command_segment)

    batch = sub.add_parser("batch", help="segment every case folder under --input")
    batch.add_argument("--input", type=Path, required=True)
    batch.add_argument("--output", type=Path, required=True)
    batch.add_argument("--report", action="store_true", help="also write QC pictures and volumes per case")
    batch.add_argument("--format", choices=("image", "dicom-seg"), default="image",
                       help="per case <case>.nii.gz (image), or <case>.dcm, a DICOM SEG referencing the case's "
                            "DICOM series (dicom-seg)")
    batch.add_argument("--uncertainty", action="store_true",
                       help="also write <case>_uncertainty.nii.gz per case (see segment --uncertainty; about "
                            "twice the time)")
    _add_inference_options(batch)
    batch.set_defaults(handler=command_batch)

    evaluate = sub.add_parser("evaluate", help="metrics of predictions against ground truth")
    evaluate.add_argument("--pred", type=Path, required=True, help="folder of <case>.nii.gz predictions")
    evaluate.add_argument("--gt", type=Path, required=True, help="ground truth: BraTS case folders or <case>.nii.gz")
    evaluate.add_argument("--out", type=Path, required=True, help="CSV to write")
    evaluate.add_argument("--overwrite", action="store_true")
    evaluate.set_defaults(handler=command_evaluate)

    info = sub.add_parser("info", help="methods, devices and versions")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=command_info)

    sample = sub.add_parser("sample", help="generate BraTS-like sample cases on the MNI152 template")
    sample.add_argument("--out", type=Path, required=True)
    sample.add_argument("--n", type=int, default=1)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--resolution", type=int, default=1, choices=(1, 2), help="1 mm (240x240x155) or 2 mm")
    sample.add_argument("--label-convention", default="brats2021", choices=("brats2021", "brats2023"))
    sample.add_argument("--overwrite", action="store_true", help="replace case folders that exist")
    sample.set_defaults(handler=command_sample)

    demo = sub.add_parser("demo", help="segment the embedded sample case and write a report")
    demo.add_argument("--out", type=Path, default=Path("brainlesionsam-demo"))
    _add_inference_options(demo, default_method=DEFAULT_METHOD)
    demo.set_defaults(handler=command_demo, box=None)

    # The library knows no front end: the web page is its own command, registered by its package.
    web = sub.add_parser("web", help="moved: the browser front end is the brainlesionsam-web command",
                         add_help=False)

    def command_web(args):
        given = " ".join(args.web_arguments)
        raise BrainLesionSAMError(f"the web front end is its own command: run brainlesionsam-web {given}".rstrip()
                                  + " (installed with the 'web' extra: pip install -e \".[web]\")")
    web.set_defaults(handler=command_web)
    return parser


def _one_line_input_warnings(show_other):
    """warnings.showwarning that prints an InputWarning as one 'warning: ...' line on stderr."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, InputWarning):
            print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            show_other(message, category, filename, lineno, file, line)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)  # unknown: only `web`'s, passed on in its pointer
    if unknown and args.command != "web":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.web_arguments = unknown
    return run_command(args.handler, args)


def run_command(handler, args: argparse.Namespace) -> int:
    """``handler(args)`` as a command: input warnings on one line each, a user error (or a file that
    cannot be written) as one ``error: ...`` line and status 1, Ctrl-C as status 130; no traceback.
    Front ends with their own command (``brainlesionsam-web``) run through it too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", InputWarning)
            warnings.showwarning = _one_line_input_warnings(warnings.showwarning)
            if getattr(args, "device", None):
                resolve_device(args.device)
            return handler(args)
    except BrainLesionSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the checks could not foresee (gone, no space left): one line too
        print(f"error: {error}; nothing half-written was left behind", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
