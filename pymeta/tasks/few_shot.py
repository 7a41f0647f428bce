"""N-way K-shot classification tasks from class-indexed examples (e.g. Omniglot)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from pymeta._checks import check_min_dim, check_positive_int, check_tensor
from pymeta.distributed import shard_tasks
from pymeta.task_batch import TaskBatch


class FewShot(Dataset):
    """Samples N-way K-shot tasks: N classes, K support and Q query examples of each.

    Labels are 0..N-1 in a random class order per task. Works directly (``sample``) and as a
    map-style Dataset of single tasks for a ``torch.utils.data.DataLoader`` with worker
    processes: item i is always the same task (seeded by ``seed`` and i); batch them with
    ``collate_fn=FewShot.collate``.

    Args:
        examples: (C, D, ...) tensor: D examples of each of C classes, e.g.
            ``Omniglot(root).split("train")``.
        n_way, k_shot, k_query: N, K and Q.
        num_tasks: the Dataset's length (tasks per epoch of a DataLoader).
        seed: seeds the tasks of ``__getitem__``.
    """

    def __init__(
        self,
        examples: torch.Tensor,
        n_way: int,
        k_shot: int,
        k_query: int,
        num_tasks: int = 1000,
        seed: int = 0,
    ):
        check_tensor("examples", examples)
        check_min_dim("examples", examples, 3, "(C classes, D examples, ...)")
        self.n_way = check_positive_int("n_way", n_way)
        self.k_shot = check_positive_int("k_shot", k_shot)
        self.k_query = check_positive_int("k_query", k_query)
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        classes, per_class = examples.shape[:2]
        if n_way > classes:
            raise ValueError(
                f"n_way: expected at most {classes} (the classes available), received {n_way}"
            )
        if k_shot + k_query > per_class:
            raise ValueError(
                f"k_shot + k_query: expected at most {per_class} (examples per class), "
                f"received {k_shot} + {k_query}"
            )
        self.examples = examples
        self.seed = seed

    def _draw(self, generator: torch.Generator):
        """One task's random choices: its classes (N,) and their examples (N, K + Q)."""
        classes, per_class = self.examples.shape[:2]
        chosen = torch.randperm(classes, generator=generator)[: self.n_way]
        k = self.k_shot + self.k_query
        picks = torch.stack(
            [torch.randperm(per_class, generator=generator)[:k] for _ in range(self.n_way)]
        )
        return chosen, picks

    def _task(self, generator: torch.Generator):
        return self._build(*self._draw(generator))

    def _build(self, chosen: torch.Tensor, picks: torch.Tensor):
        k = self.k_shot + self.k_query
        x = self.examples[chosen.unsqueeze(1), picks]  # (N, K + Q, ...)
        labels = torch.arange(self.n_way).unsqueeze(1).expand(-1, k)
        flat = lambda t, a, b: t[:, a:b].reshape(-1, *t.shape[2:])  # noqa: E731
        return (
            flat(x, 0, self.k_shot),
            flat(labels, 0, self.k_shot),
            flat(x, self.k_shot, k),
            flat(labels, self.k_shot, k),
        )

    def sample(
        self, num_tasks: int, generator: torch.Generator | None = None, shard=None
    ) -> TaskBatch:
        """A TaskBatch of num_tasks tasks: support (T, N*K, ...), query (T, N*Q, ...),
        labels int64 (T, N*K) and (T, N*Q).

        shard: ``(rank, size)`` (``pymeta.distributed.shard()``): only this rank's part of the
        tasks (``pymeta.distributed.shard(num_tasks, rank, size)``). Every rank draws the
        random choices of all num_tasks tasks and gathers the images of its own, so the ranks'
        parts are the tasks one process draws with the same generator.
        """
        check_positive_int("num_tasks", num_tasks)
        generator = (
            generator
            if generator is not None
            else torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        )
        draws = [self._draw(generator) for _ in range(num_tasks)]
        if shard is not None:
            part = shard_tasks(num_tasks, shard)
            draws = draws[part.start : part.stop]
        return self.collate([self._build(*d) for d in draws])

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"index: expected 0 <= index < {self.num_tasks}, received {index}")
        return self._task(torch.Generator().manual_seed(self.seed * 1_000_003 + index))

    @staticmethod
    def collate(tasks) -> TaskBatch:
        """Stacks single tasks (support_x, support_y, query_x, query_y) into a TaskBatch."""
        return TaskBatch(*(torch.stack(parts) for parts in zip(*tasks)))
