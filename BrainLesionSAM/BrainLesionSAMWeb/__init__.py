"""BrainLesionSAM Web: the module's Segment panel in a browser, on trame-slicer.

A second thin face on the same no-Qt MRML glue and logic as the Slicer module
(``BrainLesionSAMSlicer.mrml`` / ``.logic``): trame-slicer runs Slicer's MRML scene and its slice
and 3D views in plain Python on the ``slicer-core`` wheel and streams the rendered views to a page.

    session.py    WebSession: the case, the inputs, Segment / Refine jobs, the ROI box, Save - no web
                  server, no trame widgets (tested with off-screen views and PNG dumps)
    rendering.py  headless VTK rendering (EGL), multisampling off, view dumps
    app.py        the trame page: four views and the side panel, wired to a WebSession
    server.py     ``brainlesionsam-web`` (this package's console script): host guard, start and idle shutdown

Install with the ``web`` extra (``pip install -e ".[web]"``), then ``brainlesionsam-web``.
"""
import os
import sys

from .rendering import configure_headless_rendering

configure_headless_rendering()  # before any render window exists


def _ensureSlicerGlueImportable() -> None:
    """``BrainLesionSAMSlicer`` is a top-level package of the wheel; in a source tree it is the
    sibling folder of this one, which Slicer (and the tests) put on ``sys.path``."""
    try:
        import BrainLesionSAMSlicer  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import BrainLesionSAMSlicer  # noqa: F401


_ensureSlicerGlueImportable()
