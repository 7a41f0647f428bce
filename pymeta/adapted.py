"""AdaptedModel: the result of ``adapt(...)``, a callable model with per-task parameters."""

from __future__ import annotations

import torch


class AdaptedModel:
    """Predictions with adapted parameters; holds no graph and never touches the meta-model.

    Attributes:
        params: name -> (T, ...) adapted tensors (T=1 for a single task).
        batched: whether calls take and return a task dimension.
    """

    def __init__(self, task_forward, params: dict, fixed: dict, batched: bool, example_ndim):
        self._forward = task_forward
        self.params = params
        self._fixed = fixed
        self.batched = batched
        self._example_ndim = example_ndim

    @property
    def num_tasks(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, Q, ...) when batched, else (Q, ...) -> predictions (T, Q, ...) or (Q, ...)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x: expected a torch.Tensor, received {type(x).__name__}")
        if not self.batched:
            x = x.unsqueeze(0)
        if x.shape[0] != self.num_tasks:
            raise ValueError(
                f"x: expected {self.num_tasks} tasks in dimension 0 (as adapted), "
                f"received shape {tuple(x.shape)}"
            )
        with torch.no_grad():
            out = self._forward(self.params, self._fixed, x)
        return out if self.batched else out[0]
