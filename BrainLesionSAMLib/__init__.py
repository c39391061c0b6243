"""BrainLesionSAM library: multi-modal brain-lesion segmentation with SAM-based networks.

No slicer or Qt imports here, ever: the Slicer module and the command line are thin faces on it.
"""
__version__ = "0.1.0"
