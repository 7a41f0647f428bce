"""Peak memory of one meta-step as the number of inner steps grows.

Usage::

    .venv/bin/python benchmarks/memory_scaling.py [--threads N] [--steps 5 50]
        [--implementations pymeta_aware pymeta per_task_loop torch_func] [--order second]

The claim under test: ModelAwareMAML's peak memory at 5 inner steps is at most a third of the
per-task loop's, and from 5 to 50 steps it stays nearly flat while autograd's grows with every
step (autograd keeps every step's graph for every task until ``.backward()``; the compiled core
keeps one task per thread, recomputing activations in its reverse sweep).

Each (workload, inner steps, implementation) runs in a fresh child process (``run_child``, also
used by compare.py), so no measurement inherits another's heap. The child warms the
implementation up on a 1-step copy of the workload (lazy initialization, thread pools), then
measures one meta-step of the real one: its RSS peak (``harness.peak_rss_bytes``, counts
everything) and, on a second step, torch's allocator peak (``harness.peak_allocator_bytes``,
blind to the compiled core's workspaces). The time of the first step is shown for scale only:
one step, under the fixed mmap threshold of ``run_child`` (which makes autograd's large
allocations slower), not a benchmark (see compare.py).

Where the compiled core has an activation cache (``pymeta._C.set_activation_cache_limit``: the
reverse sweep reuses the inner loop's activations, up to a per-thread byte limit, instead of
recomputing them), the row "pymeta_aware_nocache" repeats pymeta_aware with the limit at 0:
the recompute-only memory floor.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time

import torch
from harness import FIXED_MMAP_THRESHOLD, peak_allocator_bytes, peak_rss_bytes
from workloads import IMPLEMENTATIONS, ORDERS, available, make_workload

WORKLOADS = ("sinusoid", "wide-mlp")
NOCACHE = "pymeta_aware_nocache"
DEFAULT_IMPLEMENTATIONS = ("pymeta_aware", NOCACHE, "pymeta", "per_task_loop", "torch_func")


def _cache_limit_setter():
    """``pymeta._C.set_activation_cache_limit`` where the compiled core has it, else None."""
    try:
        return getattr(importlib.import_module("pymeta._C"), "set_activation_cache_limit", None)
    except ImportError:
        return None


def _available(implementation: str) -> bool:
    if implementation == NOCACHE:
        return _cache_limit_setter() is not None
    return available(implementation)


def child(workload_name: str, steps: int, implementation: str, order: str) -> dict:
    """Runs in the child process: the measurements of one cell."""
    if implementation == NOCACHE:
        _cache_limit_setter()(0)
        implementation = "pymeta_aware"
    warm = make_workload(workload_name, inner_steps=1)
    warm.meta_step(warm.build(implementation, order))
    del warm
    workload = make_workload(workload_name, inner_steps=steps)
    maml = workload.build(implementation, order)
    seconds = []

    def timed_step():  # timed inside, so the gc and trim of peak_rss_bytes are not counted
        start = time.perf_counter()
        workload.meta_step(maml)
        seconds.append(time.perf_counter() - start)

    rss = peak_rss_bytes(timed_step)
    workload.model.zero_grad(set_to_none=True)  # the step starts without old gradients
    alloc = peak_allocator_bytes(lambda: workload.meta_step(maml))
    return {"rss": rss, "alloc": alloc, "seconds": seconds[0]}


def run_child(workload_name: str, steps: int, implementation: str, order: str, threads: int):
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", workload_name, str(steps),
        implementation, "--order", order, "--threads", str(threads),
    ]  # fmt: skip
    env = {**FIXED_MMAP_THRESHOLD, **os.environ}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"child failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # the profiler may print too


def mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.2f}"


def markdown_table(results: dict, steps_list: list[int]) -> str:
    """One row per (workload, implementation): peaks at each step count and their growth."""
    first, last = steps_list[0], steps_list[-1]
    step_cols = " | ".join(f"RSS MiB @{s} | alloc MiB @{s} | step ms @{s}" for s in steps_list)
    lines = [
        f"| workload | implementation | {step_cols} | RSS @{first} vs per_task_loop "
        f"| RSS growth @{first}->@{last} |",
        "| --- | --- |" + " ---: |" * (3 * len(steps_list) + 2),
    ]
    for (workload_name, impl), by_steps in results.items():
        cells = " | ".join(
            f"{mib(by_steps[s]['rss'])} | {mib(by_steps[s]['alloc'])} "
            f"| {by_steps[s]['seconds'] * 1e3:.1f}"
            for s in steps_list
        )
        loop = results.get((workload_name, "per_task_loop"))
        vs_loop = (
            f"{by_steps[first]['rss'] / loop[first]['rss']:.3f}"
            if loop and by_steps[first]["rss"] and loop[first]["rss"]
            else "n/a"
        )
        growth = (
            f"{by_steps[last]['rss'] / by_steps[first]['rss']:.1f}x"
            if by_steps[first]["rss"] and by_steps[last]["rss"] is not None
            else "n/a"
        )
        lines.append(f"| {workload_name} | {impl} | {cells} | {vs_loop} | {growth} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 50], help="inner steps")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=[*IMPLEMENTATIONS, NOCACHE],
        default=list(DEFAULT_IMPLEMENTATIONS),
    )
    parser.add_argument("--order", choices=ORDERS, default="second")
    parser.add_argument(
        "--child", nargs=3, metavar=("WORKLOAD", "STEPS", "IMPL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.child:
        workload_name, steps, implementation = args.child
        print(json.dumps(child(workload_name, int(steps), implementation, args.order)))
        return

    steps_list = sorted(args.steps)
    results = {}
    for workload_name in args.workloads:
        for impl in args.implementations:
            if not _available(impl):
                print(f"skipping {impl} (not available)", file=sys.stderr)
                continue
            for steps in steps_list:
                print(f"measuring {workload_name}, {steps} steps, {impl} ...", file=sys.stderr)
                cell = run_child(workload_name, steps, impl, args.order, args.threads)
                results.setdefault((workload_name, impl), {})[steps] = cell
    print(
        f"peak memory of one {args.order}-order meta-step: torch {torch.__version__}, "
        f"{args.threads} thread(s), float32\n"
    )
    print(markdown_table(results, steps_list))


if __name__ == "__main__":
    main()
