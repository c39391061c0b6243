"""A regular (non-editable) install carries the model catalogue: the wheel is built from the project's
packaging files, installed without -e into an empty folder, and a fresh interpreter that cannot see
the source tree loads the catalogue there and resolves (sha256-verified) the unet2d and litemedsam
weights, none of them inside the source tree."""
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
# What pyproject.toml builds the wheel from (its packages and package-dir entries, and the readme).
BUILD_INPUTS = ("pyproject.toml", "README.md", "BrainLesionSAMLib", "Training",
                "BrainLesionSAM/BrainLesionSAMSlicer", "BrainLesionSAM/BrainLesionSAMWeb")

RESOLVE = """
import json, sys
import BrainLesionSAMLib
from BrainLesionSAMLib import catalogue
shipped = catalogue.load_catalogue()
resolved = {method: [str(catalogue.locate(entry)) for entry in shipped.for_method(method) if entry.kind == "package"]
            for method in ("unet2d", "litemedsam")}
print(json.dumps({"library": BrainLesionSAMLib.__file__, "catalogue": str(shipped.path), "resolved": resolved,
                  "path": sys.path}))
"""


def _copy_build_inputs(destination: Path) -> None:
    """A copy of the files the wheel is built from, so that the build writes nothing into the tree."""
    for name in BUILD_INPUTS:
        source = REPOSITORY / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def test_wheel_ships_the_catalogue_and_resolves_weights_outside_the_source_tree(tmp_path):
    source, wheels, target = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    _copy_build_inputs(source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheels), str(source)], check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("brainlesionsam-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "BrainLesionSAMLib/Models.json" in names
        assert archive.read("BrainLesionSAMLib/Models.json") == (REPOSITORY / "BrainLesionSAMLib" / "Models.json").read_bytes()
        assert not any(name.endswith("Resources/Models.json") for name in names)  # one file, no second copy
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)

    # -P: no script folder or working directory on sys.path; the installed copy comes before the
    # editable install's finder (which sits at the end of sys.meta_path).
    environment = {k: v for k, v in os.environ.items() if not k.startswith("BRAINLESIONSAM")}
    environment["PYTHONPATH"] = str(target)
    completed = subprocess.run([sys.executable, "-P", "-c", RESOLVE], cwd=tmp_path, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    found = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(found["library"]).is_relative_to(target)
    assert Path(found["catalogue"]) == target / "BrainLesionSAMLib" / "Models.json"
    assert str(REPOSITORY) not in found["path"]
    source_folders = [REPOSITORY / name for name in ("BrainLesionSAMLib", "BrainLesionSAM", "Training")]
    for method, paths in found["resolved"].items():
        assert paths, f"the installed catalogue has no packaged {method} weights"
        for path in paths:
            assert Path(path).is_file() and not any(Path(path).is_relative_to(f) for f in source_folders), (method, path)
    assert all(Path(p).is_relative_to(target) for p in found["resolved"]["unet2d"])  # shipped inside the wheel
