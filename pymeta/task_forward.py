"""Runs one nn.Module on a batch of tasks, each task with its own parameters.

Vectorized with ``torch.func`` (``functional_call`` + ``vmap``) where the module allows it, a
loop over tasks where it does not. Modules with batch norm always take the loop: in torch 2.13,
vmap gives wrong second-order gradients through training-mode batch norm, and the in-place
running-statistics update is not batchable.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

VECTORIZE_CHOICES = ("auto", True, False)


def call_module(module: nn.Module, params: dict, args: tuple, kwargs: dict | None = None):
    """``module(*args, **kwargs)`` with ``params`` (named_parameters() name -> tensor) in place
    of its parameters, exact for modules used more than once and for tied parameters.

    ``functional_call``'s own tying swaps a module used twice twice, and its restore then leaves
    the replacement tensors in the user's module (torch 2.13); so every distinct (module,
    attribute) slot of a parameter is named once here, and torch's tying is not used.
    """
    first, expanded = {}, dict(params)
    for mod_name, mod in module.named_modules():  # each module object once
        for attr, p in mod._parameters.items():
            if p is None:
                continue
            name = f"{mod_name}.{attr}" if mod_name else attr
            canonical = first.setdefault(id(p), name)  # named_parameters() keeps the first
            if canonical != name and canonical in params:
                expanded[name] = params[canonical]
    return functional_call(module, expanded, args, kwargs, tie_weights=False)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, (_BatchNorm, _InstanceNorm)) for m in module.modules())


class TaskForward:
    """Calls ``module`` with per-task parameters.

    Args:
        module: any nn.Module.
        vectorize: "auto" (vmap unless the module has batch norm, falling back to the loop if
            vmap fails), True (always vmap) or False (always loop).
    """

    def __init__(self, module: nn.Module, vectorize="auto"):
        if vectorize not in VECTORIZE_CHOICES:
            raise ValueError(
                f"vectorize: expected one of {VECTORIZE_CHOICES}, received {vectorize!r}"
            )
        self.module = module
        self.can_fall_back = vectorize == "auto"
        self.vectorized = vectorize is True or (vectorize == "auto" and not has_batch_norm(module))

    def __call__(self, params: dict, fixed: dict, x: torch.Tensor) -> torch.Tensor:
        """params: name -> (T, ...) per-task tensors; fixed: name -> tensor shared by all tasks;
        x: (T, K, ...) -> predictions (T, K, ...)."""
        if self.vectorized:
            try:
                return self._vmapped(params, fixed, x)
            except (RuntimeError, NotImplementedError) as err:
                message = str(err).lower()
                if not self.can_fall_back or ("vmap" not in message and "batch" not in message):
                    raise
                warnings.warn(
                    f"pymeta: {type(self.module).__name__} cannot be vmapped ({err}); "
                    "running tasks one at a time from now on",
                    stacklevel=3,
                )
                self.vectorized = False
        return self._looped(params, fixed, x)

    def _vmapped(self, params, fixed, x):
        def one_task(task_params, task_x):
            return call_module(self.module, {**task_params, **fixed}, (task_x,))

        return vmap(one_task)(params, x)

    def _looped(self, params, fixed, x):
        outs = []
        for t in range(x.shape[0]):
            task_params = {name: value[t] for name, value in params.items()}
            outs.append(call_module(self.module, {**task_params, **fixed}, (x[t],)))
        return torch.stack(outs)
