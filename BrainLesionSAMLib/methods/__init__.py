"""Registered segmentation methods. Importing this package imports every module in it, and each
method module registers its classes with ``@register_method``: a new method is one new file here."""
import importlib
import pkgutil

from .base import (MethodFacts, SegmentationMethod, build_method, get_method_class, method_names,
                   register_method)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

# The fully automatic method a front end offers first (the demo, the web page, `info --json`).
DEFAULT_METHOD = "unet2d"

__all__ = ["DEFAULT_METHOD", "MethodFacts", "SegmentationMethod", "build_method", "get_method_class", "method_names",
           "register_method"]
