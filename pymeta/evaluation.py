"""Few-shot evaluation: accuracy after adaptation, with a 95% confidence interval."""

from __future__ import annotations

import math

import torch


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (normal approximation)."""
    values = values.double().flatten()
    if values.numel() < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), 1.96 * float(values.std(unbiased=True)) / math.sqrt(values.numel())


@torch.no_grad()
def few_shot_accuracy(
    maml, tasks, num_tasks: int, steps: int | None = None, batch_size: int = 50, seed: int = 0
) -> tuple[float, float]:
    """Query accuracy after adapting on each task's support set.

    Args:
        maml: a pymeta.MAML or ModelAwareMAML with ``adapt``.
        tasks: a task sampler with ``sample(n, generator)`` (e.g. pymeta.tasks.FewShot).
        num_tasks: tasks to evaluate (600 is the literature's convention).
        steps: adaptation steps (default: the learner's inner_steps).
        batch_size: tasks adapted at once.
        seed: seeds the tasks, so every model sees the same ones.

    Returns:
        (mean accuracy, 95% CI half-width) over tasks. Under torch.distributed every rank
        returns the same values, those of one process, and each adapts only its share.
    """
    from pymeta.distributed import gather_tasks, shard, world

    size = world()[1]
    generator = torch.Generator().manual_seed(seed)
    accs = []
    remaining = num_tasks
    while remaining > 0:
        n = min(batch_size, remaining)
        # Under torch.distributed each rank adapts its share of the batch; gathered in task
        # order, the accuracies are the single process's.
        split = size > 1 and n >= size
        batch = tasks.sample(n, generator, **({"shard": shard()} if split else {}))
        adapted = maml.adapt(batch.support_x, batch.support_y, steps=steps, batched=True)
        acc = (adapted(batch.query_x).argmax(-1) == batch.query_y).double().mean(1)
        accs.append(gather_tasks(acc) if split else acc)
        remaining -= n
    return mean_ci95(torch.cat(accs))
