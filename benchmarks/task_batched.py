"""The model-aware core one task at a time against task-batched (csrc/net/layers.h): time and
peak memory of one second-order meta-step (zero_grad, meta_loss, backward) per chunk size, on the
workloads where the choice matters. This is the measurement behind the core's default
(``pymeta._C.task_batch() == 0``: all tasks at once, except convolutional networks on the CPU,
one task at a time).

Usage::

    .venv/bin/python benchmarks/task_batched.py [--threads 1] [--repeats 5] [--device cpu]
        [--workloads sinusoid conv4 resnet12] [--chunks 1 4 all]

Each workload runs with every chunk size (``all``: the whole meta-batch as one chunk) in this
one process; times are medians of rotated rounds (harness.rotated_timings), the ratio is the
one-task-at-a-time time over the chunk's (above 1: batching is faster). On the CPU the MLP row
also shows the MLP fast path (per-task flat-buffer kernels), which the core takes for MLPs
unless it is switched off. Memory: peak RSS of one meta-step beyond its start on the CPU
(harness.peak_rss_bytes), ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import sys

import torch
from harness import peak_rss_bytes, rotated_timings
from torch import nn

import pymeta
from pymeta import _C

MIB = 1 << 20


def workload(name: str, device: str):
    """(model, batch, ModelAwareMAML kwargs) of one workload, float32."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "sinusoid":  # the MAML paper's regression: 25 tasks, K = 10
        model = nn.Sequential(
            nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
        )
        tasks, k, shape, out = 25, 10, (1,), None
        kwargs = dict(inner_lr=0.01, loss="mse")
    elif name == "conv4":  # omniglot-shaped: 5-way 1-shot, 15 queries per class, 32 tasks
        model = pymeta.models.conv4(5, in_channels=1, hidden=64, image_size=28)
        tasks, k, shape, out = 32, 5, (1, 28, 28), 5
        kwargs = dict(inner_lr=0.4, loss="cross_entropy")
    elif name == "resnet12":  # resnet12_step.py's small workload: 5-way 1-shot at 32x32
        model = pymeta.models.resnet12(5, 3, widths=(32, 80, 160, 320), image_size=32)
        tasks, k, shape, out = 2, 5, (3, 32, 32), 5
        kwargs = dict(inner_lr=0.01, loss="cross_entropy")
    else:
        raise KeyError(name)
    q = 75 if out is not None else k

    def inputs(n):
        return torch.randn(tasks, n, *shape, generator=g)

    def targets(n):
        if out is None:
            return torch.randn(tasks, n, 1, generator=g)
        return torch.arange(out).repeat(n // out).expand(tasks, -1).contiguous()

    batch = pymeta.TaskBatch(inputs(k), targets(k), inputs(q), targets(q)).to(device)
    return model.to(device), batch, kwargs


def meta_step(maml, batch):
    maml.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()


def set_path(chunk: int, mlp_fast_path: bool = False) -> None:
    _C.set_task_batch(chunk)
    _C.set_mlp_fast_path(mlp_fast_path)


def peak_memory_mib(fn, device: str) -> float | None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / MIB
    peak = peak_rss_bytes(fn)
    return None if peak is None else peak / MIB


def run_workload(name: str, chunks: list[str], device: str, repeats: int) -> list[dict]:
    model, batch, kwargs = workload(name, device)
    maml = pymeta.ModelAwareMAML(model, **kwargs)
    tasks = batch.support_x.shape[0]
    sizes = sorted({tasks if c == "all" else min(int(c), tasks) for c in chunks})
    settings = {f"chunk {n}": (n, False) for n in sizes}
    if name == "sinusoid" and device == "cpu":
        settings = {"mlp fast path": (1, True), **settings}

    def step_fn(chunk, fast):
        def fn():
            set_path(chunk, fast)
            meta_step(maml, batch)
            if device == "cuda":
                torch.cuda.synchronize()

        return fn

    fns = {label: step_fn(*s) for label, s in settings.items()}
    try:
        for fn in fns.values():
            fn()  # warm-up: lazy initialization, caches
        times = rotated_timings(fns, repeats, 0.3)
        memory = {label: peak_memory_mib(fn, device) for label, fn in fns.items()}
    finally:
        set_path(0, True)
    ref = times["chunk 1"]["median"]
    return [
        dict(workload=name, setting=label, tasks=tasks, seconds=t["median"], iqr=t["iqr"],
             speedup=ref / t["median"], mib=memory[label])
        for label, t in times.items()
    ]  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--workloads", nargs="+", default=["sinusoid", "conv4", "resnet12"])
    parser.add_argument("--chunks", nargs="+", default=["1", "4", "all"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"task-batched core, {args.device}, {args.threads} thread(s), torch {torch.__version__}")
    header = ("workload", "setting", "tasks", "s/step", "iqr", "vs chunk 1", "MiB")
    print("{:10} {:14} {:>5} {:>9} {:>8} {:>10} {:>8}".format(*header))
    for name in args.workloads:
        for row in run_workload(name, args.chunks, args.device, args.repeats):
            mib = "-" if row["mib"] is None else f"{row['mib']:.0f}"
            print(
                f"{row['workload']:10} {row['setting']:14} {row['tasks']:5d} {row['seconds']:9.4f} "
                f"{row['iqr']:8.4f} {row['speedup']:9.2f}x {mib:>8}"
            )
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
