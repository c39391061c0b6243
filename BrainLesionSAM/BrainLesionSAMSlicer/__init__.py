"""BrainLesionSAM's Slicer side without Qt: MRML glue (``mrml``), the segmentation logic with its
worker-thread jobs (``logic``) and the Python requirements (``dependencies``).

Nothing here imports Qt or needs ``slicer.app`` / ``slicer.mrmlScene``: the scene and nodes are
passed in, so the same code runs inside Slicer and in plain Python with the ``slicer-core`` wheel
(where the pytest suites in ``Testing/test_slicer_*.py`` exercise it). Nothing heavy (torch) is
imported when these modules are imported.
"""
import os
import sys


def libraryFolder() -> str:
    """The folder holding the BrainLesionSAMLib package: the scripted-modules folder of an installed
    extension (beside this package), or the repository root when Slicer loads the module from the
    source tree (the parent of the module folder)."""
    moduleFolder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in (moduleFolder, os.path.dirname(moduleFolder)):
        if os.path.isfile(os.path.join(folder, "BrainLesionSAMLib", "__init__.py")):
            return folder
    raise ImportError("the BrainLesionSAMLib package is missing next to the BrainLesionSAM module; "
                      "reinstall the BrainLesionSAM extension")


def ensureLibraryImportable() -> str:
    """Put :func:`libraryFolder` on ``sys.path`` (once) and return it."""
    folder = libraryFolder()
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


ensureLibraryImportable()
