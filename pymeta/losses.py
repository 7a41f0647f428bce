"""Task losses: built-in names ("mse", "cross_entropy") or any callable(pred, target)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossSpec = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSS_NAMES = ("mse", "cross_entropy")


class TaskLoss:
    """One task loss, computed for a single task or for a batch of tasks at once.

    Args:
        spec: "mse", "cross_entropy", or a callable ``loss(pred, target) -> scalar`` that
            returns the mean loss of one task.
    """

    def __init__(self, spec: LossSpec):
        if isinstance(spec, str):
            if spec not in LOSS_NAMES:
                raise ValueError(
                    f"loss: expected one of {LOSS_NAMES} or a callable, received {spec!r}"
                )
            self.name = spec
            self.fn = F.mse_loss if spec == "mse" else F.cross_entropy
        elif callable(spec):
            self.name = getattr(spec, "__name__", "custom")
            self.fn = spec
        else:
            raise TypeError(f"loss: expected a str or a callable, received {type(spec).__name__}")
        self.builtin = isinstance(spec, str)

    def check_targets(
        self, name: str, target: torch.Tensor, batched: bool, classes: int | None = None
    ) -> None:
        """Checks the dtype and layout of targets for this loss, and cross-entropy class indices
        against ``classes`` (the model's output width; when not known yet, that they are >= 0)."""
        if self.name == "cross_entropy" and self.builtin:
            if target.dtype != torch.long:
                raise TypeError(
                    f"{name}: cross_entropy expects int64 class indices, "
                    f"received dtype {target.dtype}"
                )
            want = 2 if batched else 1
            if target.dim() != want:
                raise ValueError(
                    f"{name}: cross_entropy expects class indices of shape "
                    f"{'(T, K)' if batched else '(K,)'}, received {tuple(target.shape)}"
                )
            check_class_range(name, target, classes)
        elif self.name == "mse" and self.builtin and not target.is_floating_point():
            raise TypeError(
                f"{name}: mse expects floating-point targets, received dtype {target.dtype}"
            )

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of one task. pred: (K, ...), target: (K, ...) -> scalar."""
        return self.fn(pred, target)

    def per_task(
        self, pred: torch.Tensor, target: torch.Tensor, vectorize: bool, name: str = "targets"
    ) -> torch.Tensor:
        """Mean loss of each task. pred: (T, K, ...), target: (T, K, ...) -> (T,); ``name``
        is the targets' argument name in errors."""
        tasks = pred.shape[0]
        if self.builtin and self.name == "mse":
            if pred.shape != target.shape:
                raise ValueError(
                    f"{name}: mse expects the model's output shape {tuple(pred.shape)}, "
                    f"received {tuple(target.shape)}"
                )
            return (pred - target).square().reshape(tasks, -1).mean(1)
        if self.builtin:
            k = target.shape[1]
            logits = pred.reshape(tasks * k, -1)
            check_class_range(name, target, logits.shape[1])
            flat = F.cross_entropy(logits, target.reshape(-1), reduction="none")
            return flat.view(tasks, k).mean(1)
        if vectorize:
            return torch.func.vmap(self.fn)(pred, target)
        return torch.stack([self.fn(pred[t], target[t]) for t in range(tasks)])


def check_class_range(name: str, target: torch.Tensor, classes: int | None) -> None:
    """Class indices in [0, classes), or >= 0 when ``classes`` is None. F.cross_entropy would
    take -100 as its ignore_index and drop the example, and the core cannot index past the
    model's output: both are refused here, for both variants."""
    if not target.numel():
        return
    lo, hi = int(target.min()), int(target.max())
    if lo < 0 or (classes is not None and hi >= classes):
        expected = "class indices >= 0" if classes is None else f"class indices in [0, {classes})"
        raise ValueError(f"{name}: expected {expected}, received values in [{lo}, {hi}]")
