"""One-table comparison of pymeta.MAML against the plain-PyTorch baselines.

Usage::

    .venv/bin/python benchmarks/compare.py [--threads N] [--repeats R]

Everything runs in one process, per (workload, order):

* Time: each implementation is warmed up, then timed for ``--repeats`` rounds. Within a round
  every implementation runs once, in an order rotated from round to round, so slow drifts of
  a shared machine (other processes, thermal/frequency changes) hit all of them alike. One
  sample is a run of back-to-back meta-steps lasting at least ``--min-sample-ms`` (calibrated
  from the warm-up), divided by the number of steps. The table reports the median sample
  and its interquartile range.
* Peak memory: one further meta-step per implementation under ``torch.profiler`` with
  ``profile_memory=True``, which records every allocation and free of torch's CPU allocator
  (so every CPU tensor, including those allocated by pymeta's compiled core). Sorting those
  events by time, the running sum of their sizes is the memory held beyond what was live
  when the step began (model, meta-batch: grads are cleared first); its maximum is the
  reported peak. Memory outside torch's allocator (Python objects, the allocator's own
  caching, if any) is not counted. The profiled step is not timed.

"x faster" columns are baseline time / implementation time: above 1 means faster than the
baseline.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

# Run as a script, this file's folder is sys.path[0]: the sibling modules import directly.
from workloads import IMPLEMENTATIONS, ORDERS, WORKLOADS, make_workload

import pymeta

BASELINES = ("torch_func", "per_task_loop")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def time_steps(workload, maml, steps: int) -> float:
    """Seconds per meta-step, averaged over ``steps`` back-to-back steps."""
    start = time.perf_counter()
    for _ in range(steps):
        workload.meta_step(maml)
    return (time.perf_counter() - start) / steps


def peak_step_bytes(workload, maml) -> int:
    """Peak bytes held by torch's CPU allocator during one meta-step, beyond those live at its
    start (see the module docstring)."""
    workload.model.zero_grad(set_to_none=True)  # the step starts without old gradients
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        workload.meta_step(maml)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def measure(workload_name: str, order: str, repeats: int, min_sample_s: float) -> dict:
    """{implementation: {"median", "iqr" (seconds), "peak" (bytes), "loss"}} for one cell."""
    workload = make_workload(workload_name)
    impls = {name: workload.build(name, order) for name in IMPLEMENTATIONS}
    steps, results = {}, {}
    for name, maml in impls.items():
        loss = workload.meta_step(maml)  # first call: lazy initialization, caches
        per_step = time_steps(workload, maml, 2)
        steps[name] = max(1, math.ceil(min_sample_s / per_step))
        results[name] = {"loss": loss.item(), "samples": []}
    names = list(impls)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            results[name]["samples"].append(time_steps(workload, impls[name], steps[name]))
    for name, maml in impls.items():
        q1, median, q3 = quartiles(results[name]["samples"])
        results[name].update(median=median, iqr=q3 - q1, peak=peak_step_bytes(workload, maml))
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


def markdown_table(all_results: dict) -> str:
    header = (
        "| workload | order | implementation | median ms | IQR ms | x faster vs torch_func "
        "| x faster vs per_task_loop | peak MB |"
    )
    lines = [header, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for (workload_name, order), results in all_results.items():
        for name, res in results.items():
            ratios = [results[b]["median"] / res["median"] for b in BASELINES]
            lines.append(
                f"| {workload_name} | {order} | {name} | {res['median'] * 1e3:.2f} "
                f"| {res['iqr'] * 1e3:.2f} | {ratios[0]:.2f}x | {ratios[1]:.2f}x "
                f"| {res['peak'] / 2**20:.2f} |"
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
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats: expected at least 2")

    torch.set_num_threads(args.threads)
    all_results = {}
    for workload_name in args.workloads:
        for order in args.orders:
            log(f"measuring {workload_name} / {order} order ...")
            results = measure(workload_name, order, args.repeats, args.min_sample_ms / 1e3)
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
