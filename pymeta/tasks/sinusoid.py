"""Sinusoid regression tasks of the MAML paper (Finn et al. 2017, section 5.1)."""

from __future__ import annotations

import math

import torch

from pymeta._checks import check_positive_int
from pymeta.distributed import shard_tasks
from pymeta.task_batch import TaskBatch


class Sinusoid:
    """y = A sin(x - φ) with A ~ U[0.1, 5.0], φ ~ U[0, π], x ~ U[-5, 5].

    Args:
        k_support: support points per task (K).
        k_query: query points per task.
        amplitude, phase, x_range: (low, high) ranges of the uniform draws.
        dtype, device: of the sampled tensors.
    """

    def __init__(
        self,
        k_support: int = 10,
        k_query: int = 10,
        amplitude=(0.1, 5.0),
        phase=(0.0, math.pi),
        x_range=(-5.0, 5.0),
        dtype=torch.float32,
        device="cpu",
    ):
        self.k_support = check_positive_int("k_support", k_support)
        self.k_query = check_positive_int("k_query", k_query)
        for name, (low, high) in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if not low <= high:
                raise ValueError(
                    f"{name}: expected (low, high) with low <= high, received {(low, high)}"
                )
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.dtype, self.device = dtype, torch.device(device)

    def _uniform(self, shape, bounds, generator):
        low, high = bounds
        u = torch.rand(shape, generator=generator, dtype=self.dtype)
        return (low + (high - low) * u).to(self.device)

    def sample_functions(self, num_tasks: int, generator: torch.Generator | None = None):
        """Amplitudes and phases, each (T, 1, 1)."""
        check_positive_int("num_tasks", num_tasks)
        amp = self._uniform((num_tasks, 1, 1), self.amplitude, generator)
        phase = self._uniform((num_tasks, 1, 1), self.phase, generator)
        return amp, phase

    def sample(
        self, num_tasks: int, generator: torch.Generator | None = None, shard=None
    ) -> TaskBatch:
        """T tasks: support (T, k_support, 1) inputs/targets, query (T, k_query, 1).

        shard: ``(rank, size)`` (``pymeta.distributed.shard()``): only this rank's part of the
        T tasks (``pymeta.distributed.shard(T, rank, size)``). Every rank draws the random
        numbers of all T tasks, so the ranks' parts are the tasks one process draws with the
        same generator, and the generators stay in step.
        """
        amp, phase = self.sample_functions(num_tasks, generator)
        k = self.k_support + self.k_query
        x = self._uniform((num_tasks, k, 1), self.x_range, generator)
        if shard is not None:
            part = shard_tasks(num_tasks, shard)
            amp, phase, x = (t[part.start : part.stop] for t in (amp, phase, x))
        y = amp * torch.sin(x - phase)
        s = self.k_support
        return TaskBatch(x[:, :s], y[:, :s], x[:, s:], y[:, s:])
