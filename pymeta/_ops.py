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


def _named(name: str, value) -> list:
    """(label, tensor) pairs of one argument: ``name`` or ``name[i]`` for a list."""
    if isinstance(value, (list, tuple)):
        return [(f"{name}[{i}]", t) for i, t in enumerate(value)]
    return [(name, value)]


def check_one_device(op: str, **args) -> None:
    """Raises ValueError unless every tensor argument is on the device of the first one.

    The C++ kernels check the same (csrc/op_checks.h). The dispatcher sends a call to the fake
    kernel as soon as one argument is a meta tensor, so a mix of meta and CPU tensors lands in
    the fake kernels below, which must refuse it rather than return uninitialised memory.
    """
    first = None
    for name, value in args.items():
        for label, t in _named(name, value):
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise ValueError(
                    f"{op}: {label}: expected device {first[1]} like {first[0]}, "
                    f"received {t.device}"
                )


def check_one_dtype(op: str, dtype: torch.dtype, like: str, **args) -> None:
    """Raises TypeError unless every tensor argument has ``dtype`` (that of ``like``)."""
    for name, value in args.items():
        for label, t in _named(name, value):
            if t.dtype != dtype:
                raise TypeError(
                    f"{op}: {label}: expected dtype {dtype} like {like}, received {t.dtype}"
                )


if HAS_COMPILED_CORE:

    def _check_sgd_args(op, params, grads, lrs, names):
        """The sgd_update ops' rules (csrc/sgd_update.h): one device for all; grads[i] and its
        lr in params[i]'s dtype. names: what the op calls its first two lists."""
        first, second = names
        check_one_device(op, **{first: params, second: grads, "lrs": lrs})
        if len(grads) != len(params) or len(lrs) not in (1, len(params)):
            raise ValueError(
                f"{op}: expected {len(params)} {second} and 1 or {len(params)} lrs, "
                f"received {len(grads)} and {len(lrs)}"
            )
        for i, (p, g) in enumerate(zip(params, grads)):
            k = 0 if len(lrs) == 1 else i
            others = {f"{second}[{i}]": g, f"lrs[{k}]": lrs[k]}
            check_one_dtype(op, p.dtype, f"{first}[{i}]", **others)

    @torch.library.register_fake("pymeta::sgd_update")
    def _sgd_update_fake(params, grads, lrs):
        _check_sgd_args("pymeta::sgd_update", params, grads, lrs, ("params", "grads"))
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    @torch.library.register_fake("pymeta::sgd_update_backward")
    def _sgd_update_backward_fake(grads, grad_outputs, lrs, compute_lr_grad):
        _check_sgd_args(
            "pymeta::sgd_update_backward", grads, grad_outputs, lrs, ("grads", "grad_outputs")
        )
        grad_grads = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads]
        grad_lrs = [torch.empty_like(lr) for lr in lrs] if compute_lr_grad else []
        return grad_grads, grad_lrs

    # The model-aware core's layout, read from the compiled core (an import here would be
    # circular: pymeta.model_aware imports this module).
    def _encoding():
        from pymeta.model_aware import encoding

        return encoding

    def _check_core_args(op, params, lrs, loss, support_x, support_y, query_x=None, query_y=None):
        """The model-aware ops' device and dtype rules: one device for all, the params' dtype
        for the lrs and inputs, and for float targets (MSE); int64 class indices for
        cross-entropy."""
        data = {"support_x": support_x, "support_y": support_y}
        if query_x is not None:
            data.update(query_x=query_x, query_y=query_y)
        check_one_device(op, params=params, lrs=lrs, **data)
        if not params:
            raise ValueError(f"{op}: params: expected at least one tensor, received none")
        losses = _encoding().LOSSES
        floats = {k: v for k, v in data.items() if k.endswith("_x") or loss == losses["mse"]}
        check_one_dtype(op, params[0].dtype, "params[0]", params=params, lrs=lrs, **floats)
        if loss == losses["cross_entropy"]:
            labels = {k: v for k, v in data.items() if k.endswith("_y")}
            check_one_dtype(op, torch.int64, "class indices", **labels)

    def _bn_channels(layers) -> int:
        """Channels of all batch norm layers (the core's layout: pymeta.model_aware.encoding)."""
        e = _encoding()
        kind, channels = e.FIELDS["kind"], e.FIELDS["ints"] + e.BATCHNORM_INTS["channels"]
        return sum(
            row[channels] for row in e.layer_rows(layers) if row[kind] == e.KINDS["batchnorm"]
        )

    @torch.library.register_fake("pymeta::net_maml_loss")
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
        _check_core_args(
            "pymeta::net_maml_loss", params, lrs, loss, support_x, support_y, query_x, query_y
        )
        ref = params[0]
        grads = [torch.empty_like(p) for p in params] if compute_grads else []
        lr_grads = (
            [torch.empty_like(lr) for lr in lrs] if compute_grads and compute_lr_grads else []
        )
        tasks, rows = support_x.shape[0], len(step_weights) + 1
        bn_stats = ref.new_empty((tasks, rows, 2, _bn_channels(layers)))
        return ref.new_empty(()), grads, lr_grads, ref.new_empty(tasks), bn_stats

    # The outer updates work in place and return nothing: their fake kernels only check.
    @torch.library.register_fake("pymeta::adam_step")
    def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, *hyper):
        check_one_device("pymeta::adam_step", params=params, grads=grads, exp_avgs=exp_avgs)

    @torch.library.register_fake("pymeta::sgd_step")
    def _sgd_step_fake(params, grads, momentum_buffers, *hyper):
        check_one_device("pymeta::sgd_step", params=params, grads=grads)

    @torch.library.register_fake("pymeta::net_adapt")
    def _adapt_fake(params, lrs, support_x, support_y, layers, layer_args, steps, lr_mode, loss):
        _check_core_args("pymeta::net_adapt", params, lrs, loss, support_x, support_y)
        return [p.new_empty((support_x.shape[0], *p.shape)) for p in params]
