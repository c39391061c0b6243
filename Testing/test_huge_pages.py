"""Importing the library makes torch back large CPU tensors with transparent huge pages, which
removes most page faults of the networks' activations (a third of the CPU time otherwise)."""
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MEASURE = """
import resource, sys
if sys.argv[1] == "library":
    import BrainLesionSAMLib
import torch
torch.ones(16 * 2**20)  # the first large allocation reads THP_MEM_ALLOC_ENABLE
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, env_value: str | None) -> int:
    import os
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    result = subprocess.run([sys.executable, "-c", MEASURE, mode], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here")
def test_library_import_turns_on_huge_pages_for_large_tensors_unless_the_user_said_no():
    pages = 4 * 16 * 2**20 * 4 // 4096
    assert faults("plain", None) > pages // 2         # torch's default: 4 KiB pages, each faulted in
    assert faults("library", None) < pages // 8       # 2 MiB pages: a few faults per block
    assert faults("library", "0") > pages // 2        # the user's explicit choice wins
