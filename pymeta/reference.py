"""Pure-PyTorch twins of the compiled ops: same names and signatures as ``torch.ops.pymeta.*``.

They are the ground truth in the tests and the fallback when the compiled core is missing.
"""

from __future__ import annotations

import torch


def _lr_of(lrs, i):
    return lrs[0] if len(lrs) == 1 else lrs[i]


def _reduce_to_lr(x: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    if lr.dim() == 0:
        return x.sum()
    return x if lr.dim() == x.dim() else x.sum(0)


def sgd_update(params: list[torch.Tensor], grads: list[torch.Tensor], lrs: list[torch.Tensor]):
    """out[i] = params[i] - lr_i * grads[i]. params[i], grads[i]: (T, ...); lr_i: (), (...) or
    (T, ...); ``lrs`` holds one tensor shared by all params or one per param."""
    return [p - _lr_of(lrs, i) * g for i, (p, g) in enumerate(zip(params, grads))]


def sgd_update_backward(grads, grad_outputs, lrs, compute_lr_grad: bool):
    """(grad wrt grads, grad wrt lrs) of sgd_update for upstream ``grad_outputs``."""
    grad_grads = [-_lr_of(lrs, i) * u for i, u in enumerate(grad_outputs)]
    if not compute_lr_grad:
        return grad_grads, []
    parts = [
        -_reduce_to_lr(g * u, _lr_of(lrs, i)) for i, (g, u) in enumerate(zip(grads, grad_outputs))
    ]
    if len(lrs) == 1:
        return grad_grads, [sum(parts[1:], parts[0])]
    return grad_grads, parts
