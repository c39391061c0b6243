"""Re-create the packaged unet2d weights for the sample case (seeded; about 25 minutes on 2 CPU cores).

    python scripts/train_sample_weights.py
"""
from pathlib import Path

from Training.train_baseline import main

if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "BrainLesionSAMLib" / "weights" / "unet2d_sample.safetensors"
    main(["--out", str(target), "--cases", "16", "--steps", "1600"])
