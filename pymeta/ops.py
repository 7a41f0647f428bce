"""Public functional ops. Each mirrors a ``torch.ops.pymeta.<name>`` op, validates its
arguments with clear errors, and falls back to the pure-PyTorch twin without the compiled core."""

from __future__ import annotations

from typing import Sequence

import torch

from pymeta import reference
from pymeta._ops import HAS_COMPILED_CORE

# The raw op, for hot paths whose arguments were already validated.
sgd_update_unchecked = torch.ops.pymeta.sgd_update if HAS_COMPILED_CORE else reference.sgd_update


def _as_lr_list(lr, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    ref = params[0]
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return [torch.tensor(float(lr), dtype=ref.dtype, device=ref.device)]
    if isinstance(lr, torch.Tensor):
        return [lr]
    if isinstance(lr, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in lr):
        return list(lr)
    raise TypeError(
        f"lr: expected a float, a tensor or a sequence of tensors, received {type(lr).__name__}"
    )


def sgd_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: float | torch.Tensor | Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """Fused, task-batched inner update ``params[i] - lr_i * grads[i]`` for every tensor at once.

    Differentiable twice (second-order MAML differentiates through it), with respect to
    params, grads and lr.

    Args:
        params: tensors of shape (T, ...), task dimension first.
        grads: tensors shaped like ``params``.
        lr: a float; one tensor shared by all params; or one tensor per param. Each lr tensor has
            shape () (scalar), ``params[i].shape[1:]`` (per element, shared over tasks: Meta-SGD)
            or ``params[i].shape`` (per task and element).

    Returns:
        The updated tensors, shaped like ``params``.
    """
    params, grads = list(params), list(grads)
    if not params:
        raise ValueError("params: expected at least one tensor, received an empty sequence")
    if len(grads) != len(params):
        raise ValueError(
            f"grads: expected {len(params)} tensors like params, received {len(grads)}"
        )
    lrs = _as_lr_list(lr, params)
    if len(lrs) not in (1, len(params)):
        raise ValueError(f"lr: expected 1 or {len(params)} tensors, received {len(lrs)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        lr_i = lrs[0] if len(lrs) == 1 else lrs[i]
        if not p.is_floating_point():
            raise TypeError(f"params[{i}]: expected a floating-point tensor, received {p.dtype}")
        if p.dim() < 1:
            raise ValueError(f"params[{i}]: expected shape (T, ...), received a 0-dim tensor")
        if g.shape != p.shape:
            raise ValueError(
                f"grads[{i}]: expected shape {tuple(p.shape)}, received {tuple(g.shape)}"
            )
        for name, t in ((f"grads[{i}]", g), ("lr", lr_i)):
            if t.dtype != p.dtype:
                raise TypeError(
                    f"{name}: expected dtype {p.dtype} like params[{i}], received {t.dtype}"
                )
            if t.device != p.device:
                raise ValueError(
                    f"{name}: expected device {p.device} like params[{i}], received {t.device}"
                )
        if lr_i.shape not in ((), p.shape[1:], p.shape):
            raise ValueError(
                f"lr: expected shape (), {tuple(p.shape[1:])} or {tuple(p.shape)} for params[{i}], "
                f"received {tuple(lr_i.shape)}"
            )
    return sgd_update_unchecked(params, grads, lrs)
