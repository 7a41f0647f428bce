"""Model-agnostic MAML: any nn.Module, gradients from autograd, tasks batched with torch.func."""

from __future__ import annotations

import torch
from torch import nn

from pymeta._checks import (
    check_positive_int,
    check_task_data,
    check_tensor,
    support_as_batch,
)
from pymeta.adapted import AdaptedModel
from pymeta.inner_lr import InnerLR
from pymeta.learner import Learner
from pymeta.losses import LossSpec, TaskLoss
from pymeta.ops import sgd_update_unchecked
from pymeta.task_batch import TaskBatch
from pymeta.task_forward import TaskForward

_FIRST_LAYER_EXAMPLE_NDIM = {nn.Linear: 1, nn.Bilinear: 1, nn.Conv1d: 2, nn.Conv2d: 3, nn.Conv3d: 4}


class MAML(nn.Module):
    """Model-agnostic MAML (Finn et al. 2017) around any ``nn.Module``.

    The meta-parameters are the module's parameters plus, if learned, the inner learning rates:
    ``maml.parameters()`` is what a meta-optimizer takes. Parameters with
    ``requires_grad=False`` stay fixed in the inner loop. Modules used more than once and tied
    parameters (one Parameter in two modules) are exact: one parameter, every use.

    Batch norm follows the MAML paper: in training mode it normalizes with the statistics of
    the batch at hand (support set in the inner loop, query set after), per task. Running
    statistics are updated in place as in learn2learn; they play no part in training-mode
    outputs. Modules with batch norm run one task at a time (see ``pymeta.task_forward``).

    Args:
        model: the network. Its output for inputs (K, ...) must be (K, ...) predictions.
        inner_lr: initial inner learning rate α.
        inner_steps: inner gradient steps during ``meta_loss`` and, by default, ``adapt``.
        first_order: drop second-order terms (FOMAML).
        loss: "mse", "cross_entropy" (targets are int64 class indices in [0, classes), the
            model's output width; -100, cross-entropy's ignore_index, is refused), or a callable
            ``loss(pred, target) -> scalar`` giving one task's mean loss.
        learn_inner_lr: False, True/"scalar" (one learned rate) or "per_parameter" (Meta-SGD).
        vectorize: "auto", True or False: batch tasks with vmap, or loop over tasks.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: LossSpec = "mse",
        learn_inner_lr=False,
        vectorize="auto",
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, received {type(model).__name__}")
        self.module = model
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.first_order = bool(first_order)
        self.loss = TaskLoss(loss)
        self._adapted_names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._adapted_names:
            raise ValueError(
                "model: expected at least one parameter with requires_grad=True, received none"
            )
        params = dict(model.named_parameters())
        self.inner_lr = InnerLR(inner_lr, learn_inner_lr, [params[n] for n in self._adapted_names])
        self._forward = TaskForward(model, vectorize)
        self._example_ndim = None

    # ------------------------------------------------------------------ public API
    def forward(self, *args, **kwargs):
        """Runs the (unadapted) meta-model."""
        return self.module(*args, **kwargs)

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """Mean over tasks of the query loss after adapting on each task's support set.

        Args:
            batch: a TaskBatch of T tasks: support (T, K, ...), query (T, Q, ...).

        Returns:
            A scalar, differentiable with respect to ``self.parameters()`` (second order
            unless ``first_order``).
        """
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch: expected a pymeta.TaskBatch, received {type(batch).__name__}")
        self._check_data(
            "batch.support_x", batch.support_x, "batch.support_y", batch.support_y, True
        )
        self._check_data("batch.query_x", batch.query_x, "batch.query_y", batch.query_y, True)
        self._example_ndim = batch.support_x.dim() - 2
        params = self._expand(batch.num_tasks)
        # Under no_grad (evaluation) the expanded params do not require grad, so a differentiable
        # inner loop would take zero gradients and score the unadapted model: adapt without a
        # graph instead, as adapt() does.
        differentiable = torch.is_grad_enabled()
        params = self._inner_loop(
            params,
            batch.support_x,
            batch.support_y,
            self.inner_steps,
            differentiable,
            "batch.support_y",
        )
        return self._task_losses(params, batch.query_x, batch.query_y, "batch.query_y").mean()

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        batched: bool | None = None,
    ) -> AdaptedModel:
        """Fast adaptation for inference: runs the inner loop without building a graph.

        Args:
            support_x: (K, ...) for one task or (T, K, ...) for a batch of tasks.
            support_y: (K, ...) or (T, K, ...) targets.
            steps: inner steps (default ``inner_steps``).
            batched: whether the inputs carry a task dimension; inferred when None from earlier
                ``meta_loss`` calls or the model's first layer.

        Returns:
            An AdaptedModel: ``adapted(query_x)`` gives predictions, (Q, ...) or (T, Q, ...).
            The meta-parameters are untouched.
        """
        check_tensor("support_x", support_x)
        check_tensor("support_y", support_y)
        steps = self.inner_steps if steps is None else check_positive_int("steps", steps)
        if batched is None:
            batched = self._infer_batched(support_x, support_y)
        support_x, support_y = support_as_batch(support_x, support_y, batched)
        self._check_data("support_x", support_x, "support_y", support_y, True)
        params = [p.detach() for p in self._expand(support_x.shape[0])]
        params = self._inner_loop(params, support_x, support_y, steps, False, "support_y")
        return AdaptedModel(
            self._forward,
            dict(zip(self._adapted_names, params)),
            self._fixed(),
            batched,
            self._example_ndim,
        )

    def clone(self) -> Learner:
        """A learn2learn-style learner: ``learner.adapt(loss)`` then ``learner(x)``."""
        current = dict(self.module.named_parameters())
        return Learner(self, {n: current[n] for n in self._adapted_names})

    # ------------------------------------------------------------------ internals
    def _fixed(self) -> dict:
        adapted = set(self._adapted_names)
        return {n: p for n, p in self.module.named_parameters() if n not in adapted}

    def _expand(self, tasks: int) -> list[torch.Tensor]:
        current = dict(self.module.named_parameters())
        return [
            current[n].unsqueeze(0).expand(tasks, *current[n].shape) for n in self._adapted_names
        ]

    def _task_losses(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, y_name):
        """Per-task mean losses (T,) of per-task params (T, ...) on x (T, K, ...); y_name names
        the targets in errors."""
        pred = self._forward(dict(zip(self._adapted_names, params)), self._fixed(), x)
        return self.loss.per_task(pred, y, self._forward.vectorized, y_name)

    def _inner_loop(
        self, params, x, y, steps: int, differentiable: bool, y_name: str
    ) -> list[torch.Tensor]:
        """``steps`` SGD steps on every task at once. params: (T, ...) each.

        One autograd call per step gives every task's gradient: the losses of different tasks
        depend on different slices of the (T, ...) parameters, so the gradient of their sum is
        the stack of per-task gradients.
        """
        lrs = self.inner_lr.as_list()
        create_graph = differentiable and not self.first_order
        if not differentiable:
            lrs = [lr.detach() for lr in lrs]
        for _ in range(steps):
            with torch.enable_grad():
                if not differentiable:
                    params = [p.detach().requires_grad_() for p in params]
                losses = self._task_losses(params, x, y, y_name)
                grads = torch.autograd.grad(
                    losses.sum(), params, create_graph=create_graph, allow_unused=True
                )
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            params = sgd_update_unchecked(params, grads, lrs)
        if not differentiable:
            params = [p.detach() for p in params]
        return params

    def _infer_batched(self, support_x: torch.Tensor, support_y: torch.Tensor) -> bool:
        return infer_batched(self.module, self._example_ndim, self.loss, support_x, support_y)

    def _check_data(self, x_name, x, y_name, y, batched: bool) -> None:
        check_task_data(self.module, self.loss, x_name, x, y_name, y, batched)


def infer_batched(
    module: nn.Module,
    example_ndim,
    loss: TaskLoss,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
) -> bool:
    """Whether ``adapt``'s support_x carries a task dimension: from the rank of one example
    (``example_ndim``, seen in training; None if unknown), else from the module's first layer,
    else (cross-entropy) from the labels' rank."""
    ndim = example_ndim
    if ndim is None:
        for m in module.modules():
            if type(m) in _FIRST_LAYER_EXAMPLE_NDIM:
                ndim = _FIRST_LAYER_EXAMPLE_NDIM[type(m)]
                break
    if ndim is None and loss.builtin and loss.name == "cross_entropy":
        return support_y.dim() == 2
    if ndim is None:
        raise ValueError(
            "batched: cannot tell whether support_x carries a task dimension; "
            "pass batched=True for (T, K, ...) or batched=False for (K, ...)"
        )
    if support_x.dim() not in (ndim + 1, ndim + 2):
        raise ValueError(
            f"support_x: expected (K, ...) with {ndim + 1} dims or (T, K, ...) with {ndim + 2} "
            f"dims, received shape {tuple(support_x.shape)}"
        )
    return support_x.dim() == ndim + 2
