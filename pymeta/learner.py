"""Learner: the learn2learn-shaped path, ``learner = maml.clone(); learner.adapt(loss)``."""

from __future__ import annotations

import torch

from pymeta._checks import check_tensor
from pymeta.ops import sgd_update_unchecked
from pymeta.task_forward import call_module


class Learner:
    """A differentiable copy of a MAML model's parameters for one task.

    ``learner(x)`` runs the model with the current (adapted) parameters; ``adapt(loss)`` takes
    one inner SGD step on ``loss``. Gradients flow back to the MAML meta-parameters (and learned
    learning rates), second order unless ``first_order``.
    """

    def __init__(self, maml, params: dict):
        self._maml = maml
        self.params = params

    def __call__(self, *args, **kwargs):
        fixed = self._maml._fixed()
        return call_module(self._maml.module, {**self.params, **fixed}, args, kwargs)

    def parameters(self):
        """The current adapted parameters."""
        return iter(self.params.values())

    def clone(self) -> "Learner":
        return Learner(self._maml, dict(self.params))

    def adapt(self, loss: torch.Tensor, first_order: bool | None = None) -> "Learner":
        """One inner step θ ← θ − α ∇θ loss, in place on this learner; returns it.

        Args:
            loss: a scalar computed from this learner's outputs.
            first_order: override the MAML object's setting for this step.
        """
        check_tensor("loss", loss)
        if loss.dim() != 0:
            raise ValueError(f"loss: expected a scalar, received shape {tuple(loss.shape)}")
        first_order = self._maml.first_order if first_order is None else first_order
        names = list(self.params)
        values = [self.params[n] for n in names]
        grads = torch.autograd.grad(loss, values, create_graph=not first_order, allow_unused=True)
        grads = [torch.zeros_like(v) if g is None else g for v, g in zip(values, grads)]
        lrs = [lr.unsqueeze(0) if lr.dim() else lr for lr in self._maml.inner_lr.as_list()]
        new = sgd_update_unchecked(
            [v.unsqueeze(0) for v in values], [g.unsqueeze(0) for g in grads], lrs
        )
        self.params = {n: v.squeeze(0) for n, v in zip(names, new)}
        return self
