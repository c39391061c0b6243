"""BrainLesionSAM library: multi-modal brain-lesion segmentation with SAM-based networks.

No slicer or Qt imports here, ever: the Slicer module and the command line are thin faces on it.
"""
import os

# torch's CPU allocator backs large tensors with transparent huge pages when this is set (read at
# torch's first large allocation, so setting it here works even after `import torch`). Without it,
# a third of a TinyViT encode's CPU time is the kernel faulting every activation in again, 4 KiB
# at a time: one encode at 256 on 1 thread took 2.2-2.5 s with ~300,000-460,000 page faults and
# 1.5-1.6 s with it (docs/benchmarks.md). A value the user set is kept (0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
