"""Python requirements inside Slicer: checked without importing them, installed only when asked.

- torch and torchvision come through the PyTorch extension's ``PyTorchUtils`` (it picks the build
  matching the NVIDIA driver); without that extension the message says how to get it.
- Everything else the library needs is in ``Resources/requirements.txt`` (floor and ceiling per
  package) and is installed with ``slicer.util.pip_install`` after the user confirms.
- A package that was already imported and gets replaced needs a restart; ``ensure`` says so.
- Headless and ``--testing`` runs never prompt: they get a :class:`DependencyError` that lists the
  missing packages and the command that installs them.

Nothing is imported or installed when this module is imported.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from BrainLesionSAMLib.errors import BrainLesionSAMError

TORCH_REQUIREMENT = "torch>=2.1"
TORCHVISION_REQUIREMENT = "torchvision>=0.16"
REQUIREMENTS_FILE = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"


class DependencyError(BrainLesionSAMError):
    """A Python package BrainLesionSAM needs is missing or has an unsupported version."""


def _requirementClass():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # Slicer's Python always has pip, which vendors packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def readRequirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


@dataclass(frozen=True)
class UnmetRequirement:
    requirement: str          # as written, e.g. 'monai>=1.3,<2'
    installed: str | None     # installed version, None when missing

    def __str__(self) -> str:
        state = "not installed" if self.installed is None else f"version {self.installed} installed"
        return f"{self.requirement} ({state})"


def unmetRequirements(requirements: list[str]) -> list[UnmetRequirement]:
    """Requirements whose distribution is missing or outside the version range (metadata only)."""
    Requirement = _requirementClass()
    unmet = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(UnmetRequirement(text, None))
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            unmet.append(UnmetRequirement(text, version))
    return unmet


def torchProblem() -> UnmetRequirement | None:
    """None when torch and torchvision are installed in supported versions."""
    unmet = unmetRequirements([TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT])
    return unmet[0] if unmet else None


def installCommand(unmet: list[UnmetRequirement]) -> str:
    quoted = " ".join(f'"{u.requirement}"' for u in unmet)
    return f"PythonSlicer -m pip install {quoted}"


def checkDependencies(requirementsFile: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    """What is missing, in words ([] when everything is there); installs nothing."""
    problems = []
    torch = torchProblem()
    if torch is not None:
        problems.append(f"PyTorch: {torch} - install the PyTorch extension (Extensions Manager) and click "
                        "Segment in the BrainLesionSAM module, or run: "
                        f'PythonSlicer -m pip install "{TORCH_REQUIREMENT}" "{TORCHVISION_REQUIREMENT}"')
    unmet = unmetRequirements(readRequirements(requirementsFile))
    if unmet:
        problems.append(f"Python packages: {', '.join(str(u) for u in unmet)} - install them with: "
                        f"{installCommand(unmet)}")
    return problems


def requireDependencies(requirementsFile: str | os.PathLike = REQUIREMENTS_FILE) -> None:
    """Raise DependencyError listing what is missing and how to install it (never prompts)."""
    problems = checkDependencies(requirementsFile)
    if problems:
        raise DependencyError("BrainLesionSAM cannot run yet: " + "; ".join(problems))


def isInteractive() -> bool:
    """True only in the Slicer application with its main window and not in --testing mode."""
    try:
        import slicer
    except ImportError:
        return False
    app = getattr(slicer, "app", None)
    if app is None:
        return False
    options = app.commandOptions()
    return not (options.testingEnabled or options.noMainWindow)


def _importedModulesOf(distributions: list[str]) -> list[str]:
    """Top-level modules of these distributions that are already imported (a replaced, imported
    package keeps running its old code until Slicer restarts)."""
    try:
        mapping = importlib.metadata.packages_distributions()
    except Exception:  # noqa: BLE001 - metadata of some unrelated package may be broken
        mapping = {}
    wanted = {d.lower().replace("_", "-") for d in distributions}
    return sorted(module for module, dists in mapping.items()
                  if module in sys.modules and any(d.lower().replace("_", "-") in wanted for d in dists))


def installTorch(torchUtilsLogic=None) -> None:
    """Install torch through PyTorchUtils (the user confirms in its own dialog)."""
    if torchUtilsLogic is None:
        try:
            import PyTorchUtils
        except ImportError:
            raise DependencyError(
                "PyTorch is not installed and the PyTorch extension is missing: install 'PyTorch' from the "
                "Extensions Manager, restart Slicer and click Segment again (it then installs the PyTorch "
                "build that fits your GPU driver)") from None
        torchUtilsLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchUtilsLogic.installTorch(askConfirmation=True,
                                         torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
    if torch is None:
        raise DependencyError("PyTorch was not installed (cancelled); BrainLesionSAM cannot segment without it")


def ensureDependencies(confirm: Callable[[str], bool] | None, interactive: bool | None = None,
                       requirementsFile: str | os.PathLike = REQUIREMENTS_FILE, torchUtilsLogic=None,
                       pipInstall: Callable[[list[str]], None] | None = None) -> bool:
    """Make the requirements available; returns True when Slicer must restart before segmenting.

    ``confirm(message)`` asks the user (OK/Cancel). Non-interactive runs (headless, --testing, no
    ``confirm``) install nothing and raise DependencyError with the instructions instead.
    """
    interactive = isInteractive() if interactive is None else interactive
    problems = checkDependencies(requirementsFile)
    if not problems:
        return False
    if not interactive or confirm is None:
        raise DependencyError("BrainLesionSAM cannot run yet: " + "; ".join(problems))
    restart = False
    if torchProblem() is not None:
        wasImported = "torch" in sys.modules
        installTorch(torchUtilsLogic)
        restart = restart or wasImported
    unmet = unmetRequirements(readRequirements(requirementsFile))
    if unmet:
        message = ("BrainLesionSAM needs these Python packages, which will now be downloaded and installed "
                   "into Slicer's Python (this can take a few minutes):\n\n" + "\n".join(f"  {u}" for u in unmet)
                   + "\n\nInstall them?")
        if not confirm(message):
            raise DependencyError("the required Python packages were not installed (declined); install them "
                                  f"later with: {installCommand(unmet)}")
        if pipInstall is None:
            import slicer.util
            pipInstall = slicer.util.pip_install
        Requirement = _requirementClass()
        alreadyImported = _importedModulesOf([Requirement(u.requirement).name for u in unmet])
        pipInstall([u.requirement for u in unmet])
        importlib.invalidate_caches()
        still = unmetRequirements([u.requirement for u in unmet])
        if still:
            raise DependencyError(f"installing {', '.join(str(u) for u in still)} failed; see the Python console, "
                                  f"or install them with: {installCommand(still)}")
        restart = restart or bool(alreadyImported)
    return restart


def torchAvailable() -> bool:
    """torch can be imported (checked without importing it)."""
    return importlib.util.find_spec("torch") is not None
