"""Keeping freed memory in the process, so that large tensors freed by one task are reused by the
next instead of being handed back to the kernel and faulted in again.

glibc's malloc serves large blocks (from 128 KiB, a threshold it raises as blocks are freed, up to
32 MiB) with fresh mmap'ed pages and returns heap memory above a small threshold to the kernel on
free. A meta-step allocates and frees the same activation-sized blocks task after task, so with
those defaults a task can pay a page fault per 4 KiB of activations, and the kernel zeroes the
pages again. Measured in fresh processes on the omniglot-shaped second-order meta-step
(``benchmarks/page_faults.py --warmup 4 --steps 2``, 1 thread): ``ModelAwareMAML`` (which frees
each task's activations as soon as it is done) 99,160 faults and 0.164 s of system time per step
on top of 0.588 s of user time; the per-task autograd loop 19,722 faults and 0.049 s; with
``retain_freed_memory()`` 0 and 1 faults and no system time. How many faults the defaults
cause depends on the process's history (glibc raises its thresholds as ever larger blocks are
freed). PyTorch's CPU performance guide makes the same point with other allocators (jemalloc,
tcmalloc).

The model-aware core does not need the process-wide setting: while its ops run, it serves large
CPU allocations from its own cache of freed blocks (``csrc/cpu/workspace.h``), which keeps them
for the next task, inner step and call, up to ``core_workspace_limit()`` bytes. The functions
below inspect and bound that cache. ``retain_freed_memory`` still helps everything else
(``pymeta.MAML``, autograd loops, data loading).
"""

from __future__ import annotations

import ctypes
import platform

from pymeta._ops import HAS_COMPILED_CORE

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest value glibc accepts on 64-bit systems


def retain_freed_memory(trim_threshold: int = 2**30) -> bool:
    """Makes glibc's malloc keep freed memory for reuse (process-wide, for the process's life).

    Blocks up to 32 MiB then come from the heap instead of mmap, and free heap memory is given
    back to the kernel only beyond ``trim_threshold`` bytes. The process's resident memory then
    stays near its peak instead of falling between meta-steps. ``python -m pymeta`` calls this;
    a library never does it behind its user's back, so call it yourself in training scripts.

    Args:
        trim_threshold: free bytes at the top of the heap kept before any is returned (>= 0,
            below 2**31).

    Returns:
        True when applied; False where malloc is not glibc's (nothing changes).
    """
    if isinstance(trim_threshold, bool) or not isinstance(trim_threshold, int):
        raise TypeError(
            f"trim_threshold: expected an int, received {type(trim_threshold).__name__}"
        )
    if not 0 <= trim_threshold < 2**31:
        raise ValueError(f"trim_threshold: expected 0 <= bytes < 2**31, received {trim_threshold}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return (
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )


def _core():
    if not HAS_COMPILED_CORE:
        raise RuntimeError("pymeta's compiled core failed to load (see the warning at import)")
    from pymeta import _C

    return _C


def core_workspace_bytes() -> int:
    """Bytes of freed CPU blocks the model-aware core holds for reuse now."""
    return int(_core().workspace_cached_bytes())


def core_workspace_limit() -> int:
    """The most bytes of freed blocks the core keeps (default 1 GiB); beyond, freed blocks go
    back to malloc."""
    return int(_core().workspace_cache_limit())


def set_core_workspace_limit(limit_bytes: int) -> None:
    """Bounds the core's cache of freed blocks (0: keep none). A lower limit than what is held
    frees every cached block now."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes: expected an int, received {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes: expected bytes >= 0, received {limit_bytes}")
    _core().set_workspace_cache_limit(limit_bytes)


def release_core_workspaces() -> None:
    """Frees every block the core's cache holds (e.g. before a memory-hungry phase)."""
    _core().release_workspaces()
