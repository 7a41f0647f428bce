"""Loads the compiled core and registers the fake (meta) kernels of its ops.

The schemas live in ``csrc/ops.cpp``, the kernels in ``csrc/cpu`` and ``csrc/cuda``, and the
autograd formulas in ``csrc/autograd`` (C++, so a MAML step pays no Python dispatch; every
backward is itself differentiable). The fake kernels here let ``torch.compile`` and FakeTensor
trace the ops.
"""

from __future__ import annotations

import functools
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

    def _bn_channels(core: str, layers) -> int:
        """Channels of all batch norm layers: the seq core's layers hold [kind, flag, adapted,
        six ints] each, batch norm (kind 2) its channel count in the second int."""
        if core != "seq":
            return 0
        rows = [layers[i : i + 9] for i in range(0, len(layers), 9)]
        return sum(row[4] for row in rows if row[0] == 2)

    # The MLP core and the layered core (convolutions, batch norm, pooling) share signatures.
    def _maml_loss_fake(
        core,
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
        tasks, rows = support_x.shape[0], len(step_weights) + 1
        bn_stats = ref.new_empty((tasks, rows, 2, _bn_channels(core, layers)))
        return ref.new_empty(()), grads, lr_grads, ref.new_empty(tasks), bn_stats

    def _adapt_fake(params, lrs, support_x, support_y, layers, layer_args, steps, lr_mode, loss):
        return [p.new_empty((support_x.shape[0], *p.shape)) for p in params]

    for _core in ("mlp", "seq"):
        torch.library.register_fake(f"pymeta::{_core}_maml_loss")(
            functools.partial(_maml_loss_fake, _core)
        )
        torch.library.register_fake(f"pymeta::{_core}_adapt")(_adapt_fake)
