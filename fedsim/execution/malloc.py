"""Keeping freed memory in the process (``cluster.retain_memory``).

Every SGD step allocates its activations and gradients, a few MB for a small CNN, and frees them at
the end of the step. glibc's malloc gives such memory back to the kernel as soon as the free space
at the top of its heap exceeds its trim threshold (128 KiB at start, raised at run time by a rule
that depends on the process's earlier allocations), so the next step takes it again, one page
fault per 4 KiB page. On W1 of ``scripts/bench.py`` the Ray actors spent 9-25 % of their training
thread's CPU time in the kernel that way (8,600-32,700 minor page faults per 1,000 training
examples), and how much depended on the process's history, so two actors running the same code
ran at different speeds. With fixed thresholds the heap keeps its high-water mark and a step
reuses it: the faults fall below 40 per 1,000 examples.

This changes where memory comes from, not what is computed (PyTorch aligns its CPU tensors
itself): the bit-identity check's 30 configurations give the same ``params_sha256`` with and
without it. The price is that a process's resident memory stays at its peak instead of shrinking
between steps. Elsewhere than glibc (macOS, musl) nothing is done."""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the heap's top that is kept before any is given back to the kernel."""
MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks from this size up get their own mapping (glibc's largest dynamic threshold on 64 bits);
smaller ones come from the heap and are reused."""

_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds for this process (once; later calls are free).
    Returns whether they are in effect: False where the C library is not glibc."""
    global _applied
    if _applied is None:
        _applied = _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) and _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return _applied


def _mallopt(option: int, value: int) -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(option, value))
