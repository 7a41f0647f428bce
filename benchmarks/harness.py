"""Timing and peak-memory helpers shared by the benchmark scripts (compare.py,
memory_scaling.py, adapt_speed.py).

Timing: ``rotated_timings`` runs every callable once per round, in an order rotated from round
to round, so slow drifts of a shared machine (other processes, thermal/frequency changes) hit
all of them alike. One sample is a run of back-to-back calls lasting at least
``min_sample_s`` (calibrated from a warm-up), divided by the number of calls.

Peak memory, two ways, because neither sees everything:

* ``peak_allocator_bytes``: ``torch.profiler`` with ``profile_memory=True`` records every
  allocation and free of torch's CPU allocator, i.e. every CPU tensor. Sorting those events by
  time, the running sum of their sizes is the memory held beyond what was live when the call
  began; its maximum is the peak. It does not see memory taken outside torch's allocator, such
  as the ``std::vector`` workspaces of ``pymeta.ModelAwareMAML``'s compiled core, so it
  undercounts that implementation.
* ``peak_rss_bytes``: the process's resident set, read from ``/proc/self/status``. Freed heap
  memory is first handed back to the kernel (``malloc_trim``) and the high-water mark reset
  (``/proc/self/clear_refs``), so the peak RSS during the call minus the RSS at its start counts
  every byte the call touched, whoever allocated it. It also counts Python objects and page
  rounding, so small peaks (under ~0.1 MiB) are noisy. Linux with glibc only (None elsewhere).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import itertools
import math
import statistics
import time
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile

import pymeta


def time_calls(fn: Callable[[], object], calls: int) -> float:
    """Seconds per call, averaged over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def rotated_timings(
    fns: dict[str, Callable[[], object]], repeats: int, min_sample_s: float
) -> dict[str, dict[str, float]]:
    """{name: {"median", "iqr"}} in seconds per call (see the module docstring).

    Every callable must already have run once (lazy initialization, caches).
    """
    calls = {}
    for name, fn in fns.items():
        per_call = time_calls(fn, 2)
        calls[name] = max(1, math.ceil(min_sample_s / per_call))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            samples[name].append(time_calls(fns[name], calls[name]))
    out = {}
    for name, s in samples.items():
        q1, median, q3 = quartiles(s)
        out[name] = {"median": median, "iqr": q3 - q1}
    return out


def peak_allocator_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()`` beyond those live at its start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _libc_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _libc_malloc_trim()


# Child processes that measure peak RSS run with this in their environment: a fixed mmap threshold
# stops glibc from moving large blocks onto the heap after the first frees (its dynamic
# threshold), where fragmentation made the RSS peaks of autograd-heavy steps vary by +-20% from
# run to run; with it they repeat to ~1%.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def status_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_bytes(fn: Callable[[], object]) -> int | None:
    """Peak resident memory during ``fn()`` beyond the resident memory at its start, or None
    where the high-water mark cannot be reset (see the module docstring)."""
    if _MALLOC_TRIM is None:
        return None
    gc.collect()
    # Without the trim, heap pages freed by earlier calls stay resident and the call under
    # test reuses them without raising the RSS: its peak would read as ~0. The same holds for
    # the blocks the model-aware core keeps for reuse (pymeta.memory).
    pymeta.memory.release_core_workspaces()
    _MALLOC_TRIM(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        start = status_kib("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, status_kib("VmHWM") - start) * 1024
