"""Re-create the packaged unet2d weights: the phantom study's unet2d run, exported (issue 10).

    python scripts/train_sample_weights.py [--threads N]

1. Runs the unet2d row of the phantom study (``benchmarks/phantom_study.py`` with ``STUDY_SETTINGS``
   into ``runs/phantom_study``; a finished run is reused, an interrupted one resumed): about 20
   minutes of one CPU core for training and 2 minutes for the test set. Its page goes into that
   folder; ``docs/phantom_study.md`` is rebuilt from the whole study (see that page).
2. Exports the run's final weights in the release format to
   ``BrainLesionSAMLib/weights/unet2d_sample.safetensors`` and prints the ``sha256`` and ``size``
   that the ``unet2d-sample-v1`` entry of ``BrainLesionSAMLib/Models.json`` must carry.

The study trains and tests on generated cases with seeds from ``sample.STUDY_SEEDS_FROM`` on, so the
demo's case and the tests' cases are never seen in training.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainLesionSAMLib.sample import STUDY_SEEDS_FROM  # noqa: E402
from Training.export import export_packaged_weights  # noqa: E402

STUDY_OUT = REPO / "runs" / "phantom_study"
STUDY_SETTINGS = ["--budget-steps", "1600", "--batch-size", "8", "--train-cases", "16", "--test-cases", "8",
                  "--resolution", "1", "--device", "cpu"]
TARGET = REPO / "BrainLesionSAMLib" / "weights" / "unet2d_sample.safetensors"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the training run")
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "phantom_study.py"), "--methods", "unet2d",
                    "--tables", "main", *STUDY_SETTINGS, "--threads", str(args.threads), "--out", str(STUDY_OUT),
                    "--page", str(STUDY_OUT / "phantom_study.md")],  # docs/phantom_study.md is the whole study's
                   check=True)
    settings = dict(zip(STUDY_SETTINGS[::2], STUDY_SETTINGS[1::2]))
    description = (f"BrainLesionSAM phantom study (benchmarks/phantom_study.py), run unet2d: "
                   f"{settings['--train-cases']} generated cases at {settings['--resolution']} mm, seeds {STUDY_SEEDS_FROM}+, "
                   f"config unet2d, {settings['--budget-steps']} steps of batch {settings['--batch-size']}")
    entry = export_packaged_weights(STUDY_OUT / "runs" / "unet2d", TARGET, which="final", training_data=description)
    print(f"wrote {TARGET}")
    print("Models.json, entry unet2d-sample-v1:", json.dumps({"sha256": entry["sha256"], "size": entry["size"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
