"""One-table comparison of pymeta.MAML and pymeta.ModelAwareMAML against the baselines.

Usage::

    .venv/bin/python benchmarks/compare.py [--threads N] [--repeats R]

Everything runs in one process, per (workload, order), for every implementation in
``workloads.IMPLEMENTATIONS`` whose package is installed (learn2learn, higher and torchopt are
optional; missing ones are skipped and named on stderr):

* Time: each implementation is warmed up, then timed with ``harness.rotated_timings``: ``--repeats``
  rounds, each running every implementation once in an order rotated from round to round; one
  sample is a run of back-to-back meta-steps lasting at least ``--min-sample-ms``. The table
  reports the median sample and its interquartile range.
* Peak memory of one meta-step, in a fresh child process per implementation
  (``memory_scaling.run_child``, so the heap left by the timing runs does not blur it),
  measured two ways (``harness``): "RSS" is the resident-memory growth of the process and counts
  everything; "alloc" counts torch's CPU allocator only, so it misses the compiled core's
  workspaces (pymeta_aware's "alloc" is only its output tensors). Both are beyond what was
  live when the step began (model, meta-batch: grads are cleared first).

"x faster" columns are reference time / implementation time: above 1 means faster than the
reference. ``benchmarks/memory_scaling.py`` measures how peak memory grows with inner steps.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys

import torch

# Run as a script, this file's folder is sys.path[0]: the sibling modules import directly.
from harness import rotated_timings
from memory_scaling import run_child
from workloads import IMPLEMENTATIONS, ORDERS, WORKLOADS, available_implementations, make_workload

import pymeta

# Ratio columns of the table, in this order.
REFERENCES = ("torch_func", "per_task_loop", "pymeta")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(
    workload_name: str,
    order: str,
    implementations: list[str],
    repeats: int,
    min_sample_s: float,
    memory: bool,
) -> dict:
    """{implementation: {"median", "iqr" (seconds), "rss", "alloc" (bytes or None), "loss"}}."""
    workload = make_workload(workload_name)
    impls = {name: workload.build(name, order) for name in implementations}
    results = {}
    for name, maml in impls.items():
        loss = workload.meta_step(maml)  # first call: lazy initialization, caches
        results[name] = {"loss": loss.item()}
    steps = {name: functools.partial(workload.meta_step, maml) for name, maml in impls.items()}
    for name, timing in rotated_timings(steps, repeats, min_sample_s).items():
        results[name].update(timing)
    threads = torch.get_num_threads()
    for name in impls:
        cell = {"rss": None, "alloc": None}
        if memory:
            cell = run_child(
                workload_name, workload.maml_kwargs["inner_steps"], name, order, threads
            )
        results[name].update(rss=cell["rss"], alloc=cell["alloc"])
    return results


def check_losses(workload_name: str, order: str, results: dict) -> None:
    # The implementations agree to float64 precision (test_baselines_agree.py); in float32
    # a large mismatch here would mean the timed computations are not the same.
    ref = results["torch_func"]["loss"]
    for name, res in results.items():
        if not math.isclose(res["loss"], ref, rel_tol=1e-4, abs_tol=1e-6):
            log(
                f"WARNING: {workload_name}/{order}: {name} meta-loss {res['loss']:.6g} "
                f"differs from torch_func's {ref:.6g}"
            )


def mib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.2f}"


def markdown_table(all_results: dict) -> str:
    ratio_headers = " | ".join(
        f"x faster vs {'pymeta MAML' if r == 'pymeta' else r}" for r in REFERENCES
    )
    lines = [
        f"| workload | order | implementation | median ms | IQR ms | {ratio_headers} "
        "| peak MiB (RSS) | peak MiB (alloc) |",
        "| --- | --- | --- | ---: | ---: | " + "---: | " * len(REFERENCES) + "---: | ---: |",
    ]
    for (workload_name, order), results in all_results.items():
        for name, res in results.items():
            ratios = " | ".join(f"{results[r]['median'] / res['median']:.2f}x" for r in REFERENCES)
            lines.append(
                f"| {workload_name} | {order} | {name} | {res['median'] * 1e3:.2f} "
                f"| {res['iqr'] * 1e3:.2f} | {ratios} | {mib(res['rss'])} | {mib(res['alloc'])} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=21, help="timed rounds per cell (default 21)"
    )
    parser.add_argument(
        "--min-sample-ms",
        type=float,
        default=20.0,
        help="minimum duration of one timing sample (default 20)",
    )
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory columns (faster)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats: expected at least 2")

    torch.set_num_threads(args.threads)
    implementations = available_implementations()
    missing = [n for n in IMPLEMENTATIONS if n not in implementations]
    if missing:
        log(f"skipping (package not installed): {', '.join(missing)}")
    all_results = {}
    for workload_name in args.workloads:
        for order in args.orders:
            log(f"measuring {workload_name} / {order} order ...")
            results = measure(
                workload_name,
                order,
                implementations,
                args.repeats,
                args.min_sample_ms / 1e3,
                memory=not args.no_memory,
            )
            check_losses(workload_name, order, results)
            all_results[workload_name, order] = results

    print(
        f"torch {torch.__version__}, pymeta {pymeta.__version__} "
        f"(compiled core: {pymeta.HAS_COMPILED_CORE}), {torch.get_num_threads()} thread(s), "
        f"{args.repeats} rounds, samples >= {args.min_sample_ms:g} ms\n"
    )
    print(markdown_table(all_results))


if __name__ == "__main__":
    main()
