"""Registered segmentation methods. Importing this package registers every method module."""
from .base import (MethodFacts, SegmentationMethod, build_method, get_method_class, method_names,
                   register_method)
from . import unet2d  # noqa: F401  (registers 'unet2d')
from . import cmaa  # noqa: F401  (registers 'cmaa')
from . import boxprompt  # noqa: F401  (registers 'litemedsam' and 'medsam')

__all__ = ["MethodFacts", "SegmentationMethod", "build_method", "get_method_class", "method_names",
           "register_method"]
