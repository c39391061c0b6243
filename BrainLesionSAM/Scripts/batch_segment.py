"""Segment every case folder under --input with one method, headless; never prompts.

    Slicer --no-main-window --python-script BrainLesionSAM/Scripts/batch_segment.py \\
        --input cases/ --output results/ --method unet2d [--nifti] [--weights ID|FILE] [--device cpu]
    python BrainLesionSAM/Scripts/batch_segment.py ...      (plain Python with the slicer-core wheel)

Each sub-folder of --input is a case whose volumes are found by name (as `brainlesionsam batch`:
_t1/_t1ce/_t2/_flair, -t1n/-t1c/-t2w/-t2f, ...). For each case the volumes are loaded into volume
nodes and segmented by the module's logic (``SegmentationLogic.process(..., waitForCompletion=True)``,
the call the panel makes), and the segmentation node is written to ``<output>/<case>.seg.nrrd``
(with --nifti also the label map ``<output>/<case>.nii.gz``). A case whose outputs exist is skipped.
``<output>/summary.csv`` lists every case. Exit status: 0 all done or skipped, 1 some case failed
(or the setup failed), 2 bad arguments.
"""
import argparse
import csv
import sys
import time
from pathlib import Path

_script = Path(globals().get("__file__") or sys.argv[0]).resolve()
sys.path.insert(0, str(_script.parent.parent))  # the module folder, holding BrainLesionSAMSlicer

import BrainLesionSAMSlicer  # noqa: E402,F401  (puts BrainLesionSAMLib on sys.path)
import slicer  # noqa: E402

from BrainLesionSAMLib.conventions import MODALITIES, MODALITY_DISPLAY_NAMES  # noqa: E402
from BrainLesionSAMLib.errors import BrainLesionSAMError  # noqa: E402
from BrainLesionSAMLib.io import atomic_output, read_image  # noqa: E402
from BrainLesionSAMLib.pipeline import case_inputs  # noqa: E402
from BrainLesionSAMSlicer import dependencies, mrml  # noqa: E402
from BrainLesionSAMSlicer.logic import SegmentationLogic  # noqa: E402


def parseArguments(argv):
    parser = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="folder of case folders")
    parser.add_argument("--output", type=Path, required=True, help="folder for <case>.seg.nrrd (created)")
    parser.add_argument("--method", required=True, help="registered method name (see `brainlesionsam info`)")
    parser.add_argument("--weights", help="catalogue model id or weights file (default: the method's first catalogue model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="slices (or patches) per forward pass (default 8 on a GPU, 1 on the CPU)")
    parser.add_argument("--nifti", action="store_true", help="also write <case>.nii.gz label maps")
    parser.add_argument("--label-convention", default="brats2021", choices=("brats2021", "brats2023"),
                        help="numbering of the NIfTI label maps (ET = 4 or 3)")
    parser.add_argument("--cache-folder", help="weights cache (default: $BRAINLESIONSAM_CACHE or ~/.brainlesionsam/models)")
    if argv[:1] == ["--"]:  # `Slicer ... --python-script batch_segment.py -- --input ...` also works
        argv = argv[1:]
    return parser.parse_args(argv)


def segmentCase(logic, scene, folder: Path, args, outputs: dict) -> dict:
    files = case_inputs(folder)
    if not files:
        raise BrainLesionSAMError(f"no T1/T1CE/T2/FLAIR volume found by name in {folder}")
    nodes = {}
    try:
        for key in MODALITIES:
            if key in files:
                nodes[key] = mrml.addVolumeNodeFromImage(scene, read_image(files[key], MODALITY_DISPLAY_NAMES[key]),
                                                         f"{folder.name}_{key}")
        outcome = logic.process(nodes, args.method, weights=args.weights, device=args.device,
                                waitForCompletion=True)
        try:
            if "seg" in outputs:
                mrml.writeSegmentationFile(outcome.segmentationNode, outputs["seg"])
            if "nifti" in outputs:
                from BrainLesionSAMLib.pipeline import write_labels

                write_labels(outcome.result, outputs["nifti"], args.label_convention)
        finally:
            for node in (outcome.volumesTable, outcome.caseWeightsTable, outcome.segmentationNode):
                if node is not None and node.GetScene() is scene:
                    scene.RemoveNode(node)
        return {"device": outcome.device, "volumes_ml": outcome.volumesMl}
    finally:
        for node in nodes.values():
            scene.RemoveNode(node)


def main(argv) -> int:
    args = parseArguments(argv)
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    try:
        dependencies.requireDependencies()
        if not args.input.is_dir():
            raise BrainLesionSAMError(f"input folder {args.input} does not exist")
        folders = sorted(p for p in args.input.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise BrainLesionSAMError(f"no case folders in {args.input}; each case is a sub-folder with its volumes")
        if args.output.exists() and not args.output.is_dir():
            raise BrainLesionSAMError(f"--output {args.output} is a file; give a folder")
        args.output.mkdir(parents=True, exist_ok=True)
        logic = SegmentationLogic(scene, cacheFolder=args.cache_folder, batchSize=args.batch_size)
        logic.methodInfo(args.method)  # an unknown method fails before the first case
    except BrainLesionSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    rows = []
    for index, folder in enumerate(folders, 1):
        outputs = {"seg": args.output / f"{folder.name}.seg.nrrd"}
        if args.nifti:
            outputs["nifti"] = args.output / f"{folder.name}.nii.gz"
        row = {"case": folder.name, "status": "", "seconds": "", "output": str(outputs["seg"]), "device": "",
               "error": ""}
        start = time.perf_counter()
        if all(path.exists() for path in outputs.values()):
            row["status"] = "skipped (already done)"
        else:
            try:
                missing = {kind: path for kind, path in outputs.items() if not path.exists()}
                summary = segmentCase(logic, scene, folder, args, missing)
                row.update(status="done", device=summary["device"])
            except Exception as error:  # noqa: BLE001 - one failing case must not stop the others
                row["status"] = "failed"
                row["error"] = str(error) if isinstance(error, BrainLesionSAMError) else f"{type(error).__name__}: {error}"
            row["seconds"] = f"{time.perf_counter() - start:.1f}"
        rows.append(row)
        print(f"[{index}/{len(folders)}] {folder.name}: {row['status']} {row['seconds'] and row['seconds'] + ' s'} "
              f"{row['error']}".rstrip(), flush=True)
    summaryPath = args.output / "summary.csv"
    with atomic_output(summaryPath) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    failed = sum(row["status"] == "failed" for row in rows)
    print(f"wrote {summaryPath}: {len(rows) - failed} of {len(rows)} cases done or skipped, {failed} failed", flush=True)
    return 1 if failed else 0


def _exit(status: int) -> None:
    app = getattr(slicer, "app", None)
    if app is not None:  # inside Slicer: end the application with this status
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except SystemExit as stop:  # argparse: bad arguments (2) or --help (0)
        status = stop.code if isinstance(stop.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted; finished cases are kept, nothing half-written was left behind", file=sys.stderr)
        status = 130
    _exit(status)
