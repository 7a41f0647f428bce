"""Meta-training on many processes with ``torch.distributed`` (gloo on CPUs, NCCL on GPUs;
started with ``torchrun``, whose rendezvous spans machines).

Each rank runs its share of the meta-batch's tasks; ``DistributedMeta`` makes the step every rank
takes the one a single process with the whole meta-batch would take::

    import torch, torch.distributed as dist, pymeta
    from pymeta.distributed import DistributedMeta, shard

    dist.init_process_group("gloo")                 # torchrun sets rank and world size
    maml = DistributedMeta(pymeta.MAML(model, inner_lr=0.01))   # or ModelAwareMAML(...)
    opt = torch.optim.Adam(maml.parameters(), lr=1e-3)           # any optimizer
    tasks, gen = pymeta.tasks.Sinusoid(), torch.Generator().manual_seed(0)
    for step in range(1000):
        batch = tasks.sample(25, gen, shard=shard())  # this rank's tasks of the 25
        opt.zero_grad()
        maml.meta_loss(batch).backward()            # gradients averaged over all 25 tasks
        opt.step()

Why a wrapper rather than ``DistributedDataParallel``: DDP averages gradients over ranks with
equal weights and hooks every parameter's gradient as it is computed. A MAML meta-loss is a
mean over tasks, so a rank with 4 of 9 tasks must weigh 4/9, not 1/2; the model-aware core
computes all gradients in one node, and learned learning rates and per-step batch norm
statistics must be averaged too. ``DistributedMeta`` does all of it with one all-reduce of the
gradients per backward (queued to run when autograd has accumulated them), works with any
optimizer, gradient clipping and learning-rate scheduler, and leaves the module unchanged, so
its ``state_dict`` is the single-process one (checkpoints move between rank counts).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pymeta.task_batch import TaskBatch


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(n: int | None = None, rank: int | None = None, size: int | None = None):
    """This rank's part of n items split over ``size`` ranks as evenly as possible (the first
    ``n % size`` ranks take one more): a ``range`` when n is given, otherwise the pair
    ``(rank, size)`` that samplers take as ``shard=``. rank and size default to the default
    process group's (0 and 1 without one)."""
    r, s = world()
    rank = r if rank is None else rank
    size = s if size is None else size
    if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"shard: expected 0 <= rank < size, received rank {rank}, size {size}")
    if n is None:
        return rank, size
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected an int >= 0, received {n!r}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_tasks(num_tasks: int, value) -> range:
    """The tasks of a sampler's ``shard=(rank, size)`` argument out of num_tasks; every rank
    must get at least one."""
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 0 <= value[0] < value[1]
    )
    if not ok:
        raise ValueError(f"shard: expected (rank, size) with 0 <= rank < size, received {value!r}")
    part = shard(num_tasks, *value)
    if len(part) == 0:
        raise ValueError(
            f"shard: {num_tasks} tasks leave rank {value[0]} of {value[1]} without one; sample "
            f"at least {value[1]} tasks per meta-batch"
        )
    return part


def gather_tasks(values: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's per-task values (T_r, ...), concatenated in rank order: with contiguous
    shards (``shard``) that is the single process's task order. Every rank gets the result."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, values.detach().cpu(), group=group)
    return torch.cat(parts).to(values.device)


def init_from_environment(timeout_s: float = 600.0) -> bool:
    """Joins the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1):
    gloo, the CPU backend (the CLI trains on the CPU). A rank that stops answering fails the
    others after ``timeout_s``. Returns whether it made the group (then the caller destroys it).
    """
    import datetime
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False  # a single process, or a group someone else made (and will destroy)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


class DistributedMeta(nn.Module):
    """A meta-learner (``pymeta.MAML``, ``ModelAwareMAML`` or ``pymeta.baselines.Pretrained``)
    whose losses are means over the tasks of all ranks.

    At construction every rank takes rank 0's parameters and buffers, so all start equal.
    ``meta_loss(batch)`` (and ``pretrain_loss(batch)``) take this rank's tasks (``(T_r, ...)``;
    every rank at least one) and return the mean over all ranks' tasks; ``backward()`` through
    it leaves in ``.grad`` the gradient of that mean: each rank's gradient weighted by its share
    of the tasks, summed over ranks. Buffers that the call updates (per-step batch norm running
    statistics) are averaged the same way. Everything else (``adapt``, ``state_dict``,
    ``parameters``) is the wrapped module's.

    Args:
        module: the meta-learner.
        group: the process group (default: the default group).
    """

    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedMeta: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets its environment)"
            )
        self.module = module
        self.group = group
        with torch.no_grad():
            for t in self._state():
                dist.broadcast(t, src=dist.get_global_rank(group, 0) if group else 0, group=group)

    def _state(self) -> list[torch.Tensor]:
        return [p.data for p in self.module.parameters()] + list(self.module.buffers())

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        return self._mean_over_ranks(self.module.meta_loss, batch)

    def pretrain_loss(self, batch: TaskBatch) -> torch.Tensor:
        return self._mean_over_ranks(self.module.pretrain_loss, batch)

    def forward(self, batch: TaskBatch) -> torch.Tensor:
        return self.meta_loss(batch)

    def adapt(self, *args, **kwargs):
        return self.module.adapt(*args, **kwargs)

    def _mean_over_ranks(self, loss_fn, batch: TaskBatch) -> torch.Tensor:
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch: expected a TaskBatch, received {type(batch).__name__}")
        buffers = [b for b in self.module.buffers() if b.is_floating_point()]
        before = [b.clone() for b in buffers]
        local = loss_fn(batch)
        n = batch.num_tasks
        # One all-reduce: this rank's loss and buffer moves (running statistics), each times its
        # task count, and the count. Divided by the total count, they are the means over all
        # tasks; the statistics' update is linear in the batch statistics, so the averaged move
        # is the single process's. Buffers nobody moved stay bit for bit.
        with torch.no_grad():
            count = torch.tensor(float(n), dtype=torch.float64, device=local.device)
            head = torch.stack([local.detach().double() * n, count])
            moves = [(b - b0).flatten().double() * n for b, b0 in zip(buffers, before)]
            totals = torch.cat([head, *moves])
            dist.all_reduce(totals, group=self.group)
            total = float(totals[1])
            offset = 2
            for b, b0 in zip(buffers, before):
                move = totals[offset : offset + b.numel()].view_as(b) / total
                offset += b.numel()
                if move.any():  # untouched buffers (a fixed inner lr) keep their version
                    b.copy_(b0 + move.to(b.dtype))
        weight = n / total
        mean = (totals[0] / total).to(local.dtype)
        if not local.requires_grad:
            return mean
        local.register_hook(self._queue_gradient_sync)
        # Its value is the mean over all tasks; its gradient this rank's weighted share.
        return local * weight + (mean - local.detach() * weight)

    def _queue_gradient_sync(self, grad: torch.Tensor) -> torch.Tensor:
        # Runs as backward starts: remember the gradients accumulated so far (gradient
        # accumulation over several backward calls), and sum only what this backward adds.
        params = [p for p in self.module.parameters() if p.requires_grad]
        before = [None if p.grad is None else p.grad.detach().clone() for p in params]
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: self._sync_gradients(params, before)
        )
        return grad

    def _sync_gradients(self, params, before) -> None:
        parts, slots = [], []
        for p, g0 in zip(params, before):
            if p.grad is None:  # not reached by this loss (the same on every rank)
                continue
            parts.append((p.grad if g0 is None else p.grad - g0).flatten())
            slots.append((p, g0))
        if not parts:
            return
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self.group)
        offset = 0
        with torch.no_grad():
            for p, g0 in slots:
                k = p.numel()
                added = flat[offset : offset + k].view_as(p)
                p.grad.copy_(added if g0 is None else g0 + added)
                offset += k
