"""Re-create a shipped model that brainlesionsam-train makes: the synthesiser-trained unet2d (issue 19)
and the CPU releases of CMAA, DB-SAM, BrainSegDMIF and MoME (issue 21).

    python scripts/train_release_weights.py [--config CONFIG] [--threads N] [--export-only [--which last]]

CONFIG: ``unet2d_synthesis`` (unet2d-synthesis-v2), ``unet2d_synthesis_v3``, ``unet2d_synthesis_2p5d`` and
``unet2d_synthesis_2p5d_spread`` (v3's run with a 2.5D network, two starts of its first layer; measured, not exported), ``cmaa_release``
(cmaa-lite128-v1), ``cmaa_release_flair`` (its single-FLAIR control: trained for the comparison in
docs/phantom_study.md, not shipped), ``dbsam_release`` (dbsam-lite128-v2), ``brainsegdmif_release``
(brainsegdmif-lite128-v1) or ``mome_release`` (mome-2mm-v1: shipped from step 650 of its planned 1200
with ``--export-only --which last``). ``--which last`` exports a run stopped early (its last checkpoint).

1. Runs ``brainlesionsam-train --config CONFIG`` into ``runs/CONFIG``, its synthetic pools in
   ``runs/cache_CONFIG`` (a cache per run, so two runs can train side by side on the two cores): an
   interrupted run resumes exactly where it stopped (the synthetic pools are deterministic by seed,
   so a fresh machine regenerates them). ``unet2d_synthesis`` starts from the phantom-study weights
   (``unet2d_sample.safetensors``, ``scripts/train_sample_weights.py``), about 50-70 minutes on 2 CPU
   cores; ``unet2d_synthesis_v3`` continues from its result on synthesiser v3 (docs/generalisation.md
   has the measured costs and the learning curves); ``cmaa_release`` takes about 2 hours on one core,
   ``dbsam_release`` 95 min and ``brainsegdmif_release`` about 2 hours (docs/release_methods.md).
2. Exports the run's final weights in the release format to ``BrainLesionSAMLib/weights/`` (file
   per config in ``TARGETS``; the paper methods as deltas on LiteMedSAM's weights) and prints the ``sha256`` and
   ``size`` its catalogue entry must carry.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from Training.export import export_packaged_weights  # noqa: E402

WEIGHTS = REPO / "BrainLesionSAMLib" / "weights"
# config -> (release file or None for a control run that is not shipped, delta on third-party base weights,
#            storage: float16 where float32 would exceed the ~25 MB a release file may take)
TARGETS = {"unet2d_synthesis": (WEIGHTS / "unet2d_synthesis.safetensors", False, "float32"),        # unet2d-synthesis-v2
           "unet2d_synthesis_v3": (WEIGHTS / "unet2d_synthesis_v3.safetensors", False, "float32"),  # unet2d-synthesis-v3
           "unet2d_synthesis_2p5d": (None, False, "float32"),          # 2.5D at v3's budget: measured, not shipped
           "unet2d_synthesis_2p5d_spread": (None, False, "float32"),   # (benchmark runs/<config>/final.safetensors)
           "cmaa_release": (WEIGHTS / "cmaa_lite128.safetensors", True, "float32"),                 # cmaa-lite128-v1
           "cmaa_release_flair": (None, True, "float32"),
           "dbsam_release": (WEIGHTS / "dbsam_lite128.safetensors", True, "float16"),               # dbsam-lite128-v2
           "brainsegdmif_release": (WEIGHTS / "brainsegdmif_lite128.safetensors", True, "float32"), # brainsegdmif-lite128-v1
           "mome_release": (WEIGHTS / "mome_2mm.safetensors", False, "float16")}                    # mome-2mm-v1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(TARGETS), default="unet2d_synthesis")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of the training run (default: the config's train.threads)")
    parser.add_argument("--export-only", action="store_true", help="export the finished run only")
    parser.add_argument("--which", choices=("final", "last"), default="final",
                        help="export the run's final weights (default) or, for a run stopped early, its last "
                             "training checkpoint")
    args = parser.parse_args(argv)
    run_dir, (target, delta, storage) = REPO / "runs" / args.config, TARGETS[args.config]
    if not args.export_only:
        command = [sys.executable, "-m", "Training.train", "--config", args.config,
                   f"output.dir={json.dumps(str(run_dir))}",
                   f"data.cache={json.dumps(str(run_dir.parent / f'cache_{args.config}'))}"]
        if args.threads is not None:
            command.append(f"train.threads={args.threads}")
        subprocess.run(command, check=True, cwd=REPO)
    if args.which == "final":
        run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        print(f"{args.config}: {run['steps']} steps, {run['seconds'] / 60:.0f} min, best {run.get('best')}")
    if target is None:
        return 0
    entry = export_packaged_weights(run_dir, target, which=args.which, delta=delta, storage=storage)
    print(f"wrote {target}")
    print(f"Models.json, entry for {target.name}:", json.dumps({"sha256": entry["sha256"], "size": entry["size"],
                                                               "config": entry["config"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
