"""Loads the compiled core and registers the Python side of its ops.

The schemas live in ``csrc/ops.cpp``; here each op gets a fake (meta) kernel for
``torch.compile``/FakeTensor and an autograd formula. Every backward is built from ops that
are themselves differentiable, so second-order MAML can differentiate through the update.
"""

from __future__ import annotations

import warnings

import torch

from pymeta.reference import _lr_of, _reduce_to_lr

try:
    from pymeta import _C  # noqa: F401  (loading the library registers torch.ops.pymeta.*)

    HAS_COMPILED_CORE = True
except ImportError as _err:  # pragma: no cover - exercised only on broken installs
    HAS_COMPILED_CORE = False
    warnings.warn(
        f"pymeta: compiled core not available ({_err}); falling back to the pure-PyTorch "
        "reference ops, which are slower. Reinstall with `pip install --no-build-isolation -e .`.",
        stacklevel=2,
    )


def _sum_per_lr(parts, lrs):
    """Adds per-param contributions into one gradient per lr tensor (shared or one each)."""
    return [sum(parts[1:], parts[0])] if len(lrs) == 1 else list(parts)


if HAS_COMPILED_CORE:

    @torch.library.register_fake("pymeta::sgd_update")
    def _sgd_update_fake(params, grads, lrs):
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    @torch.library.register_fake("pymeta::sgd_update_backward")
    def _sgd_update_backward_fake(grads, grad_outputs, lrs, compute_lr_grad):
        grad_grads = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
        grad_lrs = [torch.empty_like(lr) for lr in lrs] if compute_lr_grad else []
        return grad_grads, grad_lrs

    def _sgd_update_setup(ctx, inputs, output):
        params, grads, lrs = inputs
        ctx.n_params = len(params)
        ctx.n_lrs = len(lrs)
        ctx.save_for_backward(*grads, *lrs)

    def _sgd_update_backward(ctx, grad_outputs):
        saved = ctx.saved_tensors
        grads, lrs = list(saved[: ctx.n_params]), list(saved[ctx.n_params :])
        grad_outputs = [
            torch.zeros_like(g) if u is None else u for g, u in zip(grads, grad_outputs)
        ]
        need_grads = ctx.needs_input_grad[1]
        need_lrs = ctx.needs_input_grad[2]
        grad_grads, grad_lrs = None, None
        if need_grads or need_lrs:
            gg, gl = torch.ops.pymeta.sgd_update_backward(grads, grad_outputs, lrs, bool(need_lrs))
            grad_grads = gg if need_grads else None
            grad_lrs = gl if need_lrs else None
        return grad_outputs, grad_grads, grad_lrs

    torch.library.register_autograd(
        "pymeta::sgd_update", _sgd_update_backward, setup_context=_sgd_update_setup
    )

    def _sgd_update_backward_setup(ctx, inputs, output):
        grads, grad_outputs, lrs, compute_lr_grad = inputs
        ctx.n = len(grads)
        ctx.compute_lr_grad = compute_lr_grad
        ctx.save_for_backward(*grads, *grad_outputs, *lrs)

    def _sgd_update_backward_backward(ctx, d_grad_grads, d_grad_lrs):
        # Outputs: A_i = -lr_i * u_i and B_j = -sum(g_i * u_i) reduced to lr_j. Both are
        # (bi)linear, so their backward is plain differentiable torch arithmetic.
        n = ctx.n
        saved = ctx.saved_tensors
        grads, outs, lrs = saved[:n], saved[n : 2 * n], list(saved[2 * n :])
        d_a = [torch.zeros_like(u) if a is None else a for u, a in zip(outs, d_grad_grads)]
        if ctx.compute_lr_grad and d_grad_lrs is not None and len(d_grad_lrs):
            d_b = [torch.zeros_like(lr) if b is None else b for lr, b in zip(lrs, d_grad_lrs)]
        else:
            d_b = [torch.zeros_like(lr) for lr in lrs]
        d_grads, d_outs, d_lr_parts = [], [], []
        for i in range(n):
            lr, b = _lr_of(lrs, i), _lr_of(d_b, i)
            d_grads.append(-b * outs[i])
            d_outs.append(-lr * d_a[i] - b * grads[i])
            d_lr_parts.append(-_reduce_to_lr(outs[i] * d_a[i], lr))
        return d_grads, d_outs, _sum_per_lr(d_lr_parts, lrs), None

    torch.library.register_autograd(
        "pymeta::sgd_update_backward",
        _sgd_update_backward_backward,
        setup_context=_sgd_update_backward_setup,
    )
