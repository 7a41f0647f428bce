"""The omniglot-shaped meta-step: conv4, 5-way 1-shot with 15 queries per class, meta-batch 8,
one inner step with lr 0.4, cross-entropy; time and peak memory of every implementation that
runs convolutional networks, plus a float64 check of each one's meta-gradient against the
per-task autograd loop (torch.func's vmap is known to get second order through batch norm
wrong in torch 2.13).

Usage::

    .venv/bin/python benchmarks/omniglot_step.py [--threads N] [--repeats R] [--retain-freed-memory]
        [--meta-batch 8] [--k-query 15] [--implementations pymeta_aware ...]

Timing as in compare.py (rounds rotate the implementations; medians), memory as the peak RSS of
one meta-step beyond the RSS at its start (harness.peak_rss_bytes), all in this one process.
``pymeta_aware_onednn_weight_grads``, ``pymeta_aware_channels_last`` and
``pymeta_aware_aten`` are ModelAwareMAML with every convolution weight gradient from oneDNN (no
matrix-product path), with the channels-last layout as its only fast path, and with all its CPU
fast paths off (every layer in ATen ops, default layout, as on CUDA).
``per_task_loop_channels_last`` is the per-task loop with images and convolution weights in the
channels-last layout that ModelAwareMAML's core uses on the CPU: it shows what the layout alone
gains. ``--retain-freed-memory`` first calls
pymeta.memory.retain_freed_memory() (as ``python -m pymeta`` does), so freed activations are
reused rather than faulted in again every task; the minor page faults and system time per
meta-step are reported either way.
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch
from baselines import ChannelsLastPerTaskLoopMAML
from harness import peak_rss_bytes, rotated_timings
from workloads import (
    IMPLEMENTATIONS,
    ORDERS,
    AtenOnlyMAML,
    ChannelsLastOnlyMAML,
    OnednnWeightGradsMAML,
    available,
)

import pymeta
from pymeta.memory import retain_freed_memory

CONV_IMPLEMENTATIONS = (
    "pymeta_aware",
    "pymeta_aware_onednn_weight_grads",
    "pymeta_aware_channels_last",
    "pymeta_aware_aten",
    "pymeta",
    "per_task_loop",
    "per_task_loop_channels_last",
    "torch_func",
    "learn2learn",
    "higher",
    "torchopt",
)


def make_batch(
    tasks: int, n_way: int, k_shot: int, k_query: int, dtype, seed: int = 0
) -> pymeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.rand(tasks, n_way * k, 1, 28, 28, generator=g, dtype=dtype)  # noqa: E731
    y = lambda k: torch.arange(n_way).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(x(k_shot), y(k_shot), x(k_query), y(k_query))


# The loop with the channels-last layout that ModelAwareMAML's core uses on the CPU, and the core
# with every weight gradient from oneDNN, with channels-last only, and with every fast path off.
CONV_ONLY = {
    "per_task_loop_channels_last": ChannelsLastPerTaskLoopMAML,
    "pymeta_aware_onednn_weight_grads": OnednnWeightGradsMAML,
    "pymeta_aware_channels_last": ChannelsLastOnlyMAML,
    "pymeta_aware_aten": AtenOnlyMAML,
}


def build(name: str, model, order: str):
    return {**IMPLEMENTATIONS, **CONV_ONLY}[name](
        model, inner_lr=0.4, inner_steps=1, first_order=order == "first", loss="cross_entropy"
    )


def meta_step(maml, model, batch):
    model.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()


def gradient_errors(names: list[str]) -> dict[str, float]:
    """Max meta-gradient error against the per-task loop over all parameters, relative to the
    largest reference gradient (float64, hidden 8). A global scale: the convolution biases in
    front of batch norm have an exact gradient of zero."""
    torch.manual_seed(0)
    model = pymeta.models.conv4(5, hidden=8).double()
    batch = make_batch(2, 5, 1, 3, torch.float64)

    def grads(name):
        meta_step(build(name, model, "second"), model, batch)
        return [p.grad.clone() for p in model.parameters()]

    reference = grads("per_task_loop")
    out = {}
    for name in names:
        got = grads(name)
        scale = max(float(b.abs().max()) for b in reference)
        out[name] = max(float((a - b).abs().max()) for a, b in zip(got, reference)) / scale
    return out


def page_faults(fn) -> tuple[int, float]:
    """Minor page faults and system CPU seconds of one ``fn()``."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    parser.add_argument("--retain-freed-memory", action="store_true")
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--k-query", type=int, default=15, help="query examples per class")
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=CONV_IMPLEMENTATIONS,
        default=CONV_IMPLEMENTATIONS,
        help="per_task_loop (the reference) is always run",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    retained = args.retain_freed_memory and retain_freed_memory()
    wanted = [n for n in CONV_IMPLEMENTATIONS if n in args.implementations or n == "per_task_loop"]
    names = [n for n in wanted if available(n)]
    skipped = [n for n in wanted if not available(n)]
    if skipped:
        print(f"not installed, skipped: {', '.join(skipped)}", file=sys.stderr)
    print(
        f"omniglot-shaped meta-step: conv4 (64 channels), 5-way 1-shot, {args.k_query} queries "
        f"per class, meta-batch {args.meta_batch}, 1 inner step; torch {torch.__version__}, "
        f"{args.threads} thread(s), "
        f"{args.repeats} rounds; malloc: "
        f"{'freed memory retained' if retained else 'glibc defaults'}.\n"
    )
    errors = gradient_errors(names)
    print(
        "| order | implementation | median s | IQR s | x faster vs per_task_loop | peak MiB (RSS) "
        "| page faults | system s | 2nd-order grad error vs per_task_loop (float64) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for order in args.orders:
        torch.manual_seed(0)
        model = pymeta.models.conv4(5)
        batch = make_batch(args.meta_batch, 5, 1, args.k_query, torch.float32)
        fns = {}
        for name in names:
            maml = build(name, model, order)
            fns[name] = lambda maml=maml: meta_step(maml, model, batch)
            fns[name]()  # warm-up
        timings = rotated_timings(fns, args.repeats, min_sample_s=0.0)
        ref = timings["per_task_loop"]["median"]
        for name in names:
            t = timings[name]
            faults, system_s = page_faults(fns[name])
            rss = peak_rss_bytes(fns[name])
            err = f"{errors[name]:.1e}" if order == "second" else ""
            mib = "" if rss is None else f"{rss / 2**20:.1f}"
            speedup = ref / t["median"]
            print(
                f"| {order} | {name} | {t['median']:.3f} | {t['iqr']:.3f} | {speedup:.2f}x "
                f"| {mib} | {faults} | {system_s:.3f} | {err} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
