"""Headless rendering of trame-slicer views.

- VTK picks its OpenGL window class at run time; ``VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow``
  makes it EGL from the start, so no X display is probed (there is none on a server). EGL renders
  on the GPU when the driver offers it and on Mesa's llvmpipe (CPU) otherwise; the Debian packages
  are libegl1, libegl-mesa0, libgl1-mesa-dri and libgbm1. A value the user set is kept.
- triton (torch's compiler, when installed) bundles its own LLVM; importing it after Mesa's
  llvmpipe has loaded the system libLLVM crashes the process (segmentation fault in triton's static
  initialisers), and torch imports it lazily (torchvision, torch._dynamo). So it is imported first.
- trame-slicer creates every view with 8 multisamples; on llvmpipe the 3D view then renders
  empty, so :func:`disable_multisampling` switches it off on each view before its first render.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

EGL_WINDOW = "vtkEGLRenderWindow"


def configure_headless_rendering() -> None:
    """Call before the first render window is created (the package's import does)."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", EGL_WINDOW)
    if importlib.util.find_spec("triton") is not None:
        import triton  # noqa: F401


def disable_multisampling(views) -> None:
    for view in views:
        view.render_window().SetMultiSamples(0)


def view_pixels(view) -> np.ndarray:
    """The view rendered now, as an [height, width, 3] uint8 array (top row first)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    window = view.render_window()
    view.render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.ascontiguousarray(pixels[::-1, :, :3])


def dump_view_png(view, path: str | os.PathLike) -> Path:
    """Write what the view shows now as a PNG (server-side, no browser involved)."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    pixels = view_pixels(view)
    height, width, _ = pixels.shape
    image = vtkImageData()
    image.SetDimensions(width, height, 1)
    image.GetPointData().SetScalars(numpy_to_vtk(pixels[::-1].reshape(-1, 3).copy(), deep=True))
    path = Path(path)
    writer = vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    if not path.is_file():
        raise OSError(f"could not write {path}")
    return path
