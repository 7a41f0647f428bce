"""TaskBatch: the support and query sets of a batch of tasks, task dimension first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pymeta._checks import check_finite, check_floating, check_min_dim, check_tensor

_FIELDS = ("support_x", "support_y", "query_x", "query_y")


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch of T tasks, validated on construction.

    Args:
        support_x: (T, K, ...) support inputs, floating point.
        support_y: (T, K, ...) support targets: (T, K) class indices (int64) for
            classification, or (T, K, ...) floating targets for regression.
        query_x: (T, Q, ...) query inputs, same per-example shape as ``support_x``.
        query_y: (T, Q, ...) query targets, same per-example shape and dtype as ``support_y``.

    Raises:
        TypeError / ValueError naming the offending field, with expected vs received.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __post_init__(self) -> None:
        for name in _FIELDS:
            check_tensor(name, getattr(self, name))
        for name in ("support_x", "query_x"):
            check_floating(name, getattr(self, name))
        for name in _FIELDS:
            check_min_dim(name, getattr(self, name), 2, "(T, K, ...)")
        tasks = self.support_x.shape[0]
        for name in _FIELDS[1:]:
            got = getattr(self, name).shape[0]
            if got != tasks:
                raise ValueError(
                    f"{name}: expected {tasks} tasks (support_x.shape[0]) in dimension 0, "
                    f"received {got} (shape {tuple(getattr(self, name).shape)})"
                )
        if tasks == 0:
            raise ValueError("support_x: expected at least one task, received T=0")
        for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
            kx, ky = getattr(self, x).shape[1], getattr(self, y).shape[1]
            if kx != ky:
                raise ValueError(
                    f"{y}: expected {kx} examples per task like {x} (dimension 1), received {ky}"
                )
            if kx == 0:
                raise ValueError(
                    f"{x}: expected a non-empty set (K > 0), received shape "
                    f"{tuple(getattr(self, x).shape)}"
                )
        if self.support_x.shape[2:] != self.query_x.shape[2:]:
            raise ValueError(
                f"query_x: expected per-example shape {tuple(self.support_x.shape[2:])} like "
                f"support_x, received {tuple(self.query_x.shape[2:])}"
            )
        if self.support_y.shape[2:] != self.query_y.shape[2:]:
            raise ValueError(
                f"query_y: expected per-example shape {tuple(self.support_y.shape[2:])} like "
                f"support_y, received {tuple(self.query_y.shape[2:])}"
            )
        if self.support_y.dtype != self.query_y.dtype:
            raise TypeError(
                f"query_y: expected dtype {self.support_y.dtype} like support_y, "
                f"received {self.query_y.dtype}"
            )
        device = self.support_x.device
        for name in _FIELDS[1:]:
            if getattr(self, name).device != device:
                raise ValueError(
                    f"{name}: expected device {device} like support_x, "
                    f"received {getattr(self, name).device}"
                )
        checked = set()  # adapt() passes the support set as the query set too: check it once
        for name in _FIELDS:
            value = getattr(self, name)
            if id(value) not in checked:
                check_finite(name, value)
                checked.add(id(value))

    @property
    def num_tasks(self) -> int:
        """T, the number of tasks."""
        return self.support_x.shape[0]

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device=None, dtype: torch.dtype | None = None) -> "TaskBatch":
        """Moves every tensor to ``device``; ``dtype`` applies to floating tensors only."""
        moved = []
        for name in _FIELDS:
            t = getattr(self, name)
            moved.append(t.to(device, dtype) if t.is_floating_point() else t.to(device))
        return TaskBatch(*moved)

    def __getitem__(self, index) -> "TaskBatch":
        """Selects tasks: ``batch[2:5]`` is a TaskBatch of 3 tasks."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TaskBatch(*(getattr(self, name)[index] for name in _FIELDS))
