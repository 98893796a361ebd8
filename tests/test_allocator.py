"""equipipe.allocator: large tensors reuse the heap (no page faults per use) after the switch."""

from __future__ import annotations

import subprocess
import sys

# In a fresh interpreter: minor page faults of allocating and filling a 48 MiB tensor (above
# glibc's 32 MiB mmap ceiling) five times, before and after keep_freed_memory().
SCRIPT = """
import resource, torch
from equipipe.allocator import keep_freed_memory
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(12 * 2**20).sum()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
default = faults()
assert keep_freed_memory()
faults()
print(default, faults())
"""


def test_keep_freed_memory_stops_page_faults_of_large_tensors():
    """Linux with glibc (the pipeline's platform): the switch is on and takes effect."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 5 * 10_000  # 12,288 fresh 4 KiB pages per allocation
    assert kept < 1_000, (default, kept)


def test_training_command_sets_it():
    """``equipipe train`` calls it at start-up (the pipeline's jobs run with it)."""
    import inspect

    from equipipe import cli

    assert "keep_freed_memory()" in inspect.getsource(cli.cmd_train)
