"""Re-create the shipped default model: unet2d trained on the domain-randomised synthesiser (issue 19).

    python scripts/train_default_model.py [--threads N] [--export-only]

1. Runs ``brainlesionsam-train --config unet2d_synthesis`` into ``runs/unet2d_synthesis``: an
   interrupted run resumes exactly where it stopped (the synthetic pools are deterministic by seed,
   so a fresh machine regenerates them). It starts from the phantom-study weights
   (``unet2d_sample.safetensors``, ``scripts/train_sample_weights.py``). About 50-70 minutes on 2 CPU
   cores (docs/generalisation.md has the measured cost and the learning curve).
2. Exports the run's final weights in the release format to
   ``BrainLesionSAMLib/weights/unet2d_synthesis.safetensors`` and prints the ``sha256`` and
   ``size`` that the catalogue entry ``unet2d-synthesis-v2`` must carry.
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

RUN = REPO / "runs" / "unet2d_synthesis"
TARGET = REPO / "BrainLesionSAMLib" / "weights" / "unet2d_synthesis.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads of the training run")
    parser.add_argument("--export-only", action="store_true", help="export the finished run only")
    args = parser.parse_args(argv)
    if not args.export_only:
        subprocess.run([sys.executable, "-m", "Training.train", "--config", "unet2d_synthesis",
                        f"output.dir={json.dumps(str(RUN))}", f"train.threads={args.threads}"], check=True, cwd=REPO)
    run = json.loads((RUN / "run.json").read_text(encoding="utf-8"))
    entry = export_packaged_weights(RUN, TARGET, which="final")
    print(f"wrote {TARGET} ({run['steps']} steps, {run['seconds'] / 60:.0f} min)")
    print("Models.json, entry unet2d-synthesis-v2:", json.dumps({"sha256": entry["sha256"], "size": entry["size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
