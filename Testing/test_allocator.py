"""allocator.reuse_freed_memory: inside it, large freed blocks are reused without new page faults;
leaving it hands the memory back to the kernel. (The engine wraps CPU segmentations in it.)"""
import resource

import pytest
import torch

from BrainLesionSAMLib import allocator

pytestmark = pytest.mark.skipif(not allocator.available(), reason="the C library is not glibc")

BLOCK_FLOATS = 16 * 2**20  # 64 MiB: above glibc's largest default mmap threshold (32 MiB)


def faults_of_one_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones(BLOCK_FLOATS)  # touches every page
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def resident_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def test_freed_blocks_are_reused_inside_and_returned_after():
    pages = BLOCK_FLOATS * 4 // resource.getpagesize()
    assert faults_of_one_block() > pages // 2  # glibc's default: a fresh mmap, faulted in page by page
    with allocator.reuse_freed_memory():
        faults_of_one_block()  # the first one grows the heap
        assert faults_of_one_block() < pages // 20
        with allocator.reuse_freed_memory():  # nested use keeps the setting
            assert faults_of_one_block() < pages // 20
        assert faults_of_one_block() < pages // 20
        kept = resident_mib()
    returned = resident_mib()
    assert kept - returned > 32, (kept, returned)  # malloc_trim gave the freed heap back
    assert faults_of_one_block() > pages // 2  # the defaults are back
