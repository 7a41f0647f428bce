"""Loads the compiled core and registers the fake (meta) kernels of its ops.

The schemas live in ``csrc/ops.cpp``, the kernels in ``csrc/cpu`` and ``csrc/cuda``, and the
autograd formulas in ``csrc/autograd`` (C++, so a MAML step pays no Python dispatch; every
backward is itself differentiable). The fake kernels here let ``torch.compile`` and FakeTensor
trace the ops.
"""

from __future__ import annotations

import warnings

import torch

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


if HAS_COMPILED_CORE:

    @torch.library.register_fake("pymeta::sgd_update")
    def _sgd_update_fake(params, grads, lrs):
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    @torch.library.register_fake("pymeta::sgd_update_backward")
    def _sgd_update_backward_fake(grads, grad_outputs, lrs, compute_lr_grad):
        grad_grads = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
        grad_lrs = [torch.empty_like(lr) for lr in lrs] if compute_lr_grad else []
        return grad_grads, grad_lrs

    # The MLP core and the layered core (convolutions, batch norm, pooling) share signatures.
    def _maml_loss_fake(
        params,
        lrs,
        support_x,
        support_y,
        query_x,
        query_y,
        layers,
        layer_args,
        step_weights,
        lr_mode,
        loss,
        first_order,
        compute_grads,
        compute_lr_grads,
    ):
        ref = params[0]
        grads = [torch.empty_like(p) for p in params] if compute_grads else []
        lr_grads = (
            [torch.empty_like(lr) for lr in lrs] if compute_grads and compute_lr_grads else []
        )
        return ref.new_empty(()), grads, lr_grads, ref.new_empty(support_x.shape[0])

    def _adapt_fake(params, lrs, support_x, support_y, layers, layer_args, steps, lr_mode, loss):
        return [p.new_empty((support_x.shape[0], *p.shape)) for p in params]

    for _core in ("mlp", "seq"):
        torch.library.register_fake(f"pymeta::{_core}_maml_loss")(_maml_loss_fake)
        torch.library.register_fake(f"pymeta::{_core}_adapt")(_adapt_fake)
