"""The whole meta-training step of a ModelAwareMAML in one call: ``step = maml.compile_step(opt)``
then ``loss = step(batch)`` does what ``opt.zero_grad(); maml.meta_loss(batch).backward();
opt.step()`` does, with the same parameters to float rounding, but without the autograd round
trip or torch.optim's per-parameter Python loop: the core computes the loss and the exact
meta-gradient (``torch.ops.pymeta.net_maml_loss``), and one op applies the optimizer's update to
every parameter (``torch.ops.pymeta.adam_step`` / ``sgd_step``, torch's formulas in its operation
order, equal to ``optimizer.step()`` to float rounding).

The optimizer's state stays in the optimizer, in torch's own layout (``step``, ``exp_avg``,
``exp_avg_sq``; ``momentum_buffer``), and its hyper-parameters are read from its param groups at
every call: learning-rate schedulers, ``optimizer.state_dict()`` checkpoints and resuming with
the unfused loop (or the reverse) all work unchanged.
"""

from __future__ import annotations

import torch

# What each optimizer class allows, option -> the only value(s) the fused update implements.
_COMMON_FIXED = {
    "maximize": (False,),
    "differentiable": (False,),
    "fused": (None, False),
    "foreach": (None, False),
}
_ADAM_FIXED = {**_COMMON_FIXED, "amsgrad": (False,), "capturable": (False,)}
_SGD_FIXED = _COMMON_FIXED


class CompiledStep:
    """``loss = step(batch)``: one meta-training step of ``maml`` with ``optimizer``.

    Args:
        maml: the ModelAwareMAML whose meta-parameters the optimizer updates.
        optimizer: a ``torch.optim.Adam``, ``AdamW`` or ``SGD`` over (a subset of)
            ``maml.parameters()``, with the options torch computes on the CPU by default (no
            amsgrad, maximize, capturable, differentiable, fused or foreach).
        max_grad_norm: when given, the meta-gradient is clipped to this total 2-norm first,
            as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` does.

    After a call, each parameter's ``.grad`` holds its (clipped) meta-gradient, as after the
    unfused step's ``backward``. The optimizer's step hooks (``register_step_pre_hook``,
    ``register_step_post_hook``) are not called: the call does not go through its ``step``.
    """

    def __init__(self, maml, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None):
        self.maml = maml
        self.optimizer = optimizer
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            self.kind, fixed = "adam", _ADAM_FIXED
        elif isinstance(optimizer, torch.optim.SGD):
            self.kind, fixed = "sgd", _SGD_FIXED
        else:
            raise TypeError(
                f"optimizer: expected torch.optim.Adam, AdamW or SGD, received "
                f"{type(optimizer).__name__}; use meta_loss(batch).backward() and its step()"
            )
        for group in optimizer.param_groups:
            for option, allowed in fixed.items():
                if group.get(option, allowed[0]) not in allowed:
                    raise ValueError(
                        f"optimizer: {option}={group[option]!r} is not supported by "
                        f"compile_step (expected {allowed[0]!r})"
                    )
            if isinstance(group["lr"], torch.Tensor):
                raise ValueError("optimizer: a tensor lr is not supported by compile_step")
        if max_grad_norm is not None and not (
            isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm: expected a number > 0, received {max_grad_norm!r}")
        self.max_grad_norm = 0.0 if max_grad_norm is None else float(max_grad_norm)
        # torch clips over every parameter passed to clip_grad_norm_ at once; the fused update
        # clips per call, one call per param group.
        if self.max_grad_norm and len(optimizer.param_groups) > 1:
            raise ValueError("max_grad_norm: supported with one param group only")
        # Where each optimized parameter's gradient comes from in the core's outputs.
        core = {id(p): ("param", i) for i, p in enumerate(maml._params())}
        core.update({id(lr): ("lr", i) for i, lr in enumerate(maml.inner_lrs())})
        mine = {id(p) for p in maml.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in mine:
                    raise ValueError(
                        "optimizer: it updates a tensor that is not one of maml.parameters()"
                    )
        self._source = core
        self._learn_lrs = any(lr.requires_grad for lr in maml.inner_lrs())

    def __call__(self, batch) -> torch.Tensor:
        maml = self.maml
        with torch.no_grad():
            params = maml._params()
            sx, sy, qx, qy = maml._checked_batch(batch, params)
            args = maml._core_args(sx, sy, qx, qy, params=params)
            loss, grads, lr_grads, _, bn_stats = torch.ops.pymeta.net_maml_loss(
                *args, True, self._learn_lrs
            )
            if maml.training and maml.bn_running_stats is not None:
                maml.bn_running_stats.update(bn_stats)
            sources = {"param": grads, "lr": lr_grads}
            for group in self.optimizer.param_groups:
                params, group_grads = [], []
                for p in group["params"]:
                    where = self._source.get(id(p))
                    if where is None or not p.requires_grad:
                        continue  # not reached by the meta-loss: no gradient, as unfused
                    if where[0] == "lr" and not self._learn_lrs:
                        continue
                    params.append(p)
                    group_grads.append(sources[where[0]][where[1]])
                if params:
                    self._update(group, params, group_grads)
        # What an LR scheduler checks to know the optimizer stepped before it (it wraps
        # optimizer.step, which this call does not go through).
        self.optimizer._opt_called = True
        return loss

    def _update(self, group: dict, params: list, grads: list) -> None:
        state = self.optimizer.state
        if self.kind == "adam":
            for p in params:
                if len(state[p]) == 0:  # torch's lazy initialisation (Adam._init_group)
                    state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[p]["exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            beta1, beta2 = group["betas"]
            decoupled = isinstance(self.optimizer, torch.optim.AdamW) or group.get(
                "decoupled_weight_decay", False
            )
            torch.ops.pymeta.adam_step(
                params, grads,
                [state[p]["exp_avg"] for p in params], [state[p]["exp_avg_sq"] for p in params],
                [state[p]["step"] for p in params],
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], decoupled,
                self.max_grad_norm,
            )  # fmt: skip
        else:
            buffers, first = params, False  # without momentum torch keeps no state
            if group["momentum"] != 0:
                missing = [state[p].get("momentum_buffer") is None for p in params]
                first = all(missing)
                if any(missing) and not first:
                    raise ValueError(
                        "optimizer: some parameters of a group have momentum buffers and some not"
                    )
                if first:
                    for p in params:
                        state[p]["momentum_buffer"] = torch.zeros_like(p)
                buffers = [state[p]["momentum_buffer"] for p in params]
            torch.ops.pymeta.sgd_step(
                params, grads, buffers, group["lr"], group["momentum"], group["dampening"],
                group["weight_decay"], group["nesterov"], first, self.max_grad_norm,
            )  # fmt: skip
        for p, g in zip(params, grads):
            p.grad = g
