"""Re-create the shipped default model: unet2d trained on the domain-randomised synthesiser (issue 19).

    python scripts/train_default_model.py [--config unet2d_synthesis|unet2d_synthesis_v3] [--threads N] [--export-only]

1. Runs ``brainlesionsam-train --config CONFIG`` into ``runs/CONFIG``: an
   interrupted run resumes exactly where it stopped (the synthetic pools are deterministic by seed,
   so a fresh machine regenerates them). ``unet2d_synthesis`` starts from the phantom-study weights
   (``unet2d_sample.safetensors``, ``scripts/train_sample_weights.py``), about 50-70 minutes on 2 CPU
   cores; ``unet2d_synthesis_v3`` continues from its result on synthesiser v3 (docs/generalisation.md
   has the measured costs and the learning curves).
2. Exports the run's final weights in the release format to ``BrainLesionSAMLib/weights/`` (file
   per config in ``TARGETS``) and prints the ``sha256`` and ``size`` its catalogue entry must carry.
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
TARGETS = {"unet2d_synthesis": WEIGHTS / "unet2d_synthesis.safetensors",           # unet2d-synthesis-v2
           "unet2d_synthesis_v3": WEIGHTS / "unet2d_synthesis_v3.safetensors"}     # unet2d-synthesis-v3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=list(TARGETS), default="unet2d_synthesis")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the training run")
    parser.add_argument("--export-only", action="store_true", help="export the finished run only")
    args = parser.parse_args(argv)
    run_dir, target = REPO / "runs" / args.config, TARGETS[args.config]
    if not args.export_only:
        subprocess.run([sys.executable, "-m", "Training.train", "--config", args.config,
                        f"output.dir={json.dumps(str(run_dir))}", f"train.threads={args.threads}"], check=True, cwd=REPO)
    run = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    entry = export_packaged_weights(run_dir, target, which="final")
    print(f"wrote {target} ({run['steps']} steps, {run['seconds'] / 60:.0f} min)")
    print(f"Models.json, entry for {target.name}:", json.dumps({"sha256": entry["sha256"], "size": entry["size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
