"""Keep freed memory in the process: large CPU tensors without a page fault per page, per use.

PyTorch allocates CPU tensors with ``malloc``. glibc serves every request above its mmap
threshold (at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and returns it to the kernel on
``free``, so each use of such a tensor faults in every 4 KiB page again. The e3nn force field's
per-edge tensors are that large at evaluation batch sizes (its tensor product's output,
(~10^4 edges, 768) float32 = 32.2 MiB, and its ``torch.cat``): measured on 2 CPU cores,
~15,000 minor page faults per forward of a 16-molecule batch, about half the forward's time
under load, reported by the profiler as time in ``aten::cat`` / ``aten::copy_``.
:func:`keep_freed_memory` serves all requests from the heap and never trims it, so a training
process reuses its memory (page faults per forward: 0). The price is that the process keeps
its peak heap until it exits, which a training job does anyway.

Process-wide; the training command (``equipipe train``) calls it at start-up.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc malloc serve large requests from the heap and never trim it.

    Returns:
        True when set (glibc), False where the C library is not glibc (then nothing changes).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success, 0 on error
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
