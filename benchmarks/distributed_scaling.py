"""Meta-steps per second on 1 and on N processes (torch.distributed, gloo on 127.0.0.1), one
thread each: the omniglot-shaped conv4 meta-step (5-way 1-shot, 15 queries per class, 28x28,
one inner step, second order, Adam), with the meta-batch split over the ranks by
``pymeta.distributed.DistributedMeta``. Also prints the bytes each meta-step all-reduces.

Usage::

    .venv/bin/python benchmarks/distributed_scaling.py [--ranks 1 2] [--meta-batch 32]
        [--steps 10] [--variant aware|agnostic] [--hidden 64]

Each rank count runs in fresh processes: 2 warm-up steps, then ``--steps`` timed ones between
barriers (rank 0's wall time). The speedup is steps/s against 1 rank in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pymeta
from pymeta.distributed import DistributedMeta, shard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def omniglot_tasks(hidden_seed: int = 0):
    """A FewShot sampler over random omniglot-shaped images (100 classes x 20 examples)."""
    g = torch.Generator().manual_seed(hidden_seed)
    images = torch.rand(100, 20, 1, 28, 28, generator=g)
    return pymeta.tasks.FewShot(images, n_way=5, k_shot=1, k_query=15)


def learner(variant: str, hidden: int):
    torch.manual_seed(0)
    model = pymeta.models.conv4(5, in_channels=1, hidden=hidden, image_size=28)
    cls = pymeta.ModelAwareMAML if variant == "aware" else pymeta.MAML
    return cls(model, inner_lr=0.4, loss="cross_entropy")


def _rank(rank: int, size: int, port: int, args, queue) -> None:
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
            timeout=datetime.timedelta(seconds=300),
        )  # fmt: skip
    maml = learner(args.variant, args.hidden)
    model = DistributedMeta(maml) if size > 1 else maml
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)
    tasks, gen = omniglot_tasks(), torch.Generator().manual_seed(1)
    part = {"shard": shard()} if size > 1 else {}

    def step():
        batch = tasks.sample(args.meta_batch, gen, **part)
        opt.zero_grad(set_to_none=True)
        model.meta_loss(batch).backward()
        opt.step()

    for _ in range(2):
        step()
    if size > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        grad_bytes = sum(p.numel() * p.element_size() for p in maml.parameters())
        queue.put((seconds, grad_bytes))
    if size > 1:
        dist.destroy_process_group()


def run(size: int, args) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_rank, args=(r, size, port, args, queue)) for r in range(size)]
    for p in procs:
        p.start()
    result = queue.get(timeout=1800)
    for p in procs:
        p.join()
    if env_threads is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env_threads
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variant", choices=["aware", "agnostic"], default="aware")
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    print(
        f"omniglot-shaped conv4 ({args.hidden} channels), 5-way 1-shot, 15 queries, meta-batch "
        f"{args.meta_batch}, {args.variant}, second order, 1 thread per rank, "
        f"{args.steps} timed steps, torch {torch.__version__}"
    )
    print("| ranks | s/step | steps/s | speedup vs 1 rank | all-reduce bytes/step |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    base = None
    for size in args.ranks:
        seconds, grad_bytes = run(size, args)
        rate = args.steps / seconds
        base = base or (rate if size == 1 else None)
        speedup = f"{rate / base:.2f}x" if base else "-"
        comm = grad_bytes if size > 1 else 0
        print(f"| {size} | {seconds / args.steps:.3f} | {rate:.3f} | {speedup} | {comm:,} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
