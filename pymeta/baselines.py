"""The non-meta-learned baseline: pretrain one network on all training data, fine-tune per task.

The MAML paper (Finn et al. 2017, section 5.1) compares against a network "pretrained on all
of the tasks" and fine-tuned by gradient descent on each test task's support set; for few-shot
classification the standard form (the "Baseline" of Chen et al. 2019, "A Closer Look at
Few-shot Classification") trains a classifier over all training classes and, per test task,
fits a new linear head on the frozen features. ``Pretrained`` is both, with the same ``adapt``
contract as ``pymeta.MAML`` so that the same evaluation code measures either.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pymeta._checks import (
    check_finite,
    check_floating,
    check_min_dim,
    check_positive_int,
    check_task_data,
    check_tensor,
    support_as_batch,
)
from pymeta.adapted import AdaptedModel
from pymeta.losses import LossSpec, TaskLoss
from pymeta.maml import infer_batched
from pymeta.ops import sgd_update_unchecked
from pymeta.task_batch import TaskBatch
from pymeta.task_forward import TaskForward
from pymeta.training import History, meta_train

ADAPT_LAYERS = (None, "head")


class Pretrained(nn.Module):
    """A network trained without meta-learning, then fine-tuned on each task's support set.

    Pretraining is plain supervised learning: minimise ``pretrain_loss`` with any optimizer
    over ``pretrained.parameters()`` (or use ``pretrain`` for class-indexed examples).
    ``adapt`` then fine-tunes a copy of the weights per task by full-batch SGD on the support
    set and returns the same ``AdaptedModel`` as ``pymeta.MAML.adapt``.

    Choices:

    * The "head" is the model's last ``nn.Linear`` (in ``named_modules`` order).
    * ``head=None`` (regression, e.g. sinusoid): fine-tuning starts from the pretrained weights,
      head included: the MAML paper's baseline.
    * ``head=n_way`` (few-shot classification): the pretraining classes are not the task's, so
      every task gets a fresh n_way-output head, zero-initialised: all classes start equally
      likely, and with frozen features (``adapt_layers="head"``) fine-tuning is a convex
      logistic regression whose result does not depend on a random draw. With
      ``adapt_layers=None`` the whole network is fine-tuned along with the new head.
    * ``head=factory``: ``factory(in_features) -> nn.Linear`` is called once, here; its weights
      are the starting head of every task (kept as buffers, so they are saved and moved along
      with the model).
    * Batch norm behaves as in ``pymeta.MAML``: in training mode it uses the statistics of the
      batch at hand (support set while fine-tuning, query set after), so both are evaluated the
      same way.
    * With ``adapt_layers="head"`` and a model whose output is the head's output, the features
      of the support set are computed once and only the head runs in the fine-tuning steps; any
      other model reruns the network each step (same result, slower).

    Args:
        model: the network. Inputs (N, ...) -> outputs (N, ...): for classification
            pretraining, (N, C) logits over the C pretraining classes.
        loss: "mse", "cross_entropy" (int64 class indices), or a callable
            ``loss(pred, target) -> scalar`` giving one batch's mean loss.
        inner_lr: fine-tuning SGD learning rate (finite, >= 0).
        inner_steps: default fine-tuning steps of ``adapt``.
        adapt_layers: None (every parameter with ``requires_grad``, plus a fresh head) or
            "head" (only the head; the rest stays at its pretrained values).
        head: None (keep the pretrained head), an int n_way (fresh zero head with n_way
            outputs), or a factory ``(in_features) -> nn.Linear``.
        vectorize: "auto", True or False: batch tasks with vmap, or loop over tasks (see
            ``pymeta.task_forward``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossSpec = "mse",
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        adapt_layers=None,
        head=None,
        vectorize="auto",
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, received {type(model).__name__}")
        if (
            isinstance(inner_lr, bool)
            or not isinstance(inner_lr, (int, float))
            or not math.isfinite(inner_lr)
            or inner_lr < 0
        ):
            raise ValueError(f"inner_lr: expected a finite number >= 0, received {inner_lr!r}")
        if adapt_layers not in ADAPT_LAYERS:
            raise ValueError(
                f"adapt_layers: expected one of {ADAPT_LAYERS}, received {adapt_layers!r}"
            )
        self.module = model
        self.loss = TaskLoss(loss)
        self.inner_lr = float(inner_lr)
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.adapt_layers = adapt_layers
        self._forward = TaskForward(model, vectorize)
        self._example_ndim = None

        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        self._head_module = linears[-1][1] if linears else None
        prefix = linears[-1][0] + "." if linears and linears[-1][0] else ""
        self._head_names = (
            [prefix + "weight"] + ([prefix + "bias"] if self._head_module.bias is not None else [])
            if linears
            else []
        )
        if not linears and (adapt_layers == "head" or head is not None):
            what = "adapt_layers='head'" if adapt_layers == "head" else "head"
            raise ValueError(
                f"model: {what} needs an nn.Linear (the head), received a model without one"
            )
        self.replaces_head = head is not None
        if self.replaces_head:
            weight, bias = self._new_head(head)
            self.register_buffer("head_weight", weight)
            if bias is not None:
                self.register_buffer("head_bias", bias)

        if adapt_layers == "head":
            self._adapted_names = list(self._head_names)
        else:
            self._adapted_names = [
                n
                for n, p in model.named_parameters()
                if p.requires_grad or (self.replaces_head and n in self._head_names)
            ]
        if not self._adapted_names:
            raise ValueError(
                "model: expected at least one parameter with requires_grad=True, received none"
            )

    # ------------------------------------------------------------------ public API
    def forward(self, *args, **kwargs):
        """Runs the pretrained network."""
        return self.module(*args, **kwargs)

    def pretrain_loss(self, x, y: torch.Tensor | None = None) -> torch.Tensor:
        """The plain supervised loss of the whole network on one batch.

        Args:
            x: inputs (N, ...); or a TaskBatch, whose support and query examples of all tasks
                are pooled into one batch ("train one network on all tasks jointly"). Pooling
                only makes sense when targets mean the same in every task (regression, or
                global class labels; not FewShot's per-task labels 0..n_way-1).
            y: targets (N, ...) or int64 class indices (N,); None when x is a TaskBatch.

        Returns:
            A scalar, differentiable with respect to ``self.parameters()``.
        """
        if isinstance(x, TaskBatch):
            if y is not None:
                raise TypeError(
                    f"y: expected None when x is a TaskBatch, received {type(y).__name__}"
                )
            batch = x
            x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
            y = torch.cat([batch.support_y.flatten(0, 1), batch.query_y.flatten(0, 1)])
        else:
            check_tensor("x", x)
            check_tensor("y", y)
            check_floating("x", x)
            check_min_dim("x", x, 1, "(N, ...)")
            check_min_dim("y", y, 1, "(N, ...)")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"y: expected {x.shape[0]} examples like x (dimension 0), "
                    f"received {y.shape[0]} (shape {tuple(y.shape)})"
                )
            if x.shape[0] == 0:
                raise ValueError(f"x: expected a non-empty batch, received shape {tuple(x.shape)}")
            check_finite("x", x)
            check_finite("y", y)
        self._check_data("x", x, "y", y, batched=False)
        self._example_ndim = x.dim() - 1
        pred = self.module(x)
        if self.loss.builtin and self.loss.name == "mse" and pred.shape != y.shape:
            raise ValueError(
                f"y: mse expects the model's output shape {tuple(pred.shape)}, "
                f"received {tuple(y.shape)}"
            )
        if self.loss.builtin and self.loss.name == "cross_entropy":
            _check_labels("y", y, pred.shape[-1], "the model's outputs")
        return self.loss(pred, y)

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        batched: bool | None = None,
    ) -> AdaptedModel:
        """Fine-tunes per task on the support set, without a graph; the pretrained weights are
        untouched.

        Args:
            support_x: (K, ...) for one task or (T, K, ...) for a batch of tasks.
            support_y: (K, ...) or (T, K, ...) targets (class indices (K,) / (T, K)).
            steps: full-batch SGD steps at ``inner_lr`` (default ``inner_steps``).
            batched: whether the inputs carry a task dimension; inferred when None from earlier
                ``pretrain_loss`` calls or the model's first layer.

        Returns:
            An AdaptedModel: ``adapted(query_x)`` gives predictions, (Q, ...) or (T, Q, ...).
        """
        check_tensor("support_x", support_x)
        check_tensor("support_y", support_y)
        steps = self.inner_steps if steps is None else check_positive_int("steps", steps)
        if batched is None:
            batched = infer_batched(
                self.module, self._example_ndim, self.loss, support_x, support_y
            )
        support_x, support_y = support_as_batch(support_x, support_y, batched)
        self._check_data("support_x", support_x, "support_y", support_y, batched=True)
        if self.replaces_head and self.loss.builtin and self.loss.name == "cross_entropy":
            _check_labels("support_y", support_y, self.head_weight.shape[0], "the new head")
        tasks = support_x.shape[0]
        start = self._starting_weights()
        names = self._adapted_names
        params = [start[n].detach().unsqueeze(0).expand(tasks, *start[n].shape) for n in names]
        fixed = {n: p.detach() for n, p in self.module.named_parameters() if n not in names}
        features = self._head_inputs(support_x) if self.adapt_layers == "head" else None
        lr = [torch.tensor(self.inner_lr, dtype=params[0].dtype, device=params[0].device)]
        for _ in range(steps):
            with torch.enable_grad():
                params = [p.detach().requires_grad_() for p in params]
                if features is None:
                    pred = self._forward(dict(zip(names, params)), fixed, support_x)
                else:
                    pred = torch.func.vmap(F.linear)(features, *params)
                losses = self.loss.per_task(pred, support_y, self._forward.vectorized, "support_y")
                grads = torch.autograd.grad(losses.sum(), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
            params = sgd_update_unchecked(params, grads, lr)
        params = [p.detach() for p in params]
        return AdaptedModel(
            self._forward, dict(zip(names, params)), fixed, batched, self._example_ndim
        )

    # ------------------------------------------------------------------ internals
    def _new_head(self, head):
        """The starting (weight (n, F), bias (n,) or None) of every task's fresh head."""
        old = self._head_module
        if isinstance(head, int) and not isinstance(head, bool):
            n = check_positive_int("head", head)
            weight = torch.zeros(
                n, old.in_features, dtype=old.weight.dtype, device=old.weight.device
            )
            bias = None if old.bias is None else weight.new_zeros(n)
            return weight, bias
        if not callable(head):
            raise TypeError(
                "head: expected None, an int (n_way) or a factory (in_features) -> nn.Linear, "
                f"received {type(head).__name__}"
            )
        new = head(old.in_features)
        if not isinstance(new, nn.Linear):
            raise TypeError(
                f"head: expected the factory to return an nn.Linear, received {type(new).__name__}"
            )
        if new.in_features != old.in_features or (new.bias is None) != (old.bias is None):
            raise ValueError(
                f"head: expected an nn.Linear with in_features={old.in_features} and "
                f"bias={old.bias is not None} like the model's last Linear, received "
                f"in_features={new.in_features}, bias={new.bias is not None}"
            )
        to = dict(dtype=old.weight.dtype, device=old.weight.device)
        bias = None if new.bias is None else new.bias.detach().to(**to).clone()
        return new.weight.detach().to(**to).clone(), bias

    def _starting_weights(self) -> dict:
        """name -> the value every task starts fine-tuning from."""
        start = dict(self.module.named_parameters())
        if self.replaces_head:
            start[self._head_names[0]] = self.head_weight
            if len(self._head_names) == 2:
                start[self._head_names[1]] = self.head_bias
        return start

    def _head_inputs(self, x: torch.Tensor) -> torch.Tensor | None:
        """The head's inputs (T, K, ..., F) for support inputs x (T, K, ...), or None when the
        model's output is not exactly the output of a single call of the head (then the
        features cannot stand in for the network)."""
        calls = []

        def record(module, inputs, output):
            calls.append((inputs[0], output))

        handle = self._head_module.register_forward_hook(record)
        features = []
        try:
            with torch.no_grad():
                # One task at a time: batch norm normalizes each task's support set on its own.
                for t in range(x.shape[0]):
                    calls.clear()
                    out = self.module(x[t])
                    if len(calls) != 1 or calls[0][1] is not out:
                        return None
                    features.append(calls[0][0])
        finally:
            handle.remove()
        return torch.stack(features)

    def _check_data(self, x_name, x, y_name, y, batched: bool) -> None:
        check_task_data(self.module, self.loss, x_name, x, y_name, y, batched)


def _check_labels(name: str, labels: torch.Tensor, classes: int, owner: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        raise ValueError(
            f"{name}: expected class indices in [0, {classes}) ({classes} classes: {owner}), "
            f"received values in [{low}, {high}]"
        )


class ClassBatches:
    """Mini-batches for supervised pretraining on every class of a class-indexed data set.

    Args:
        examples: (C, D, ...) floating tensor, D examples of each of C classes (e.g.
            ``Omniglot(root).split("train", rotations=True)``).

    ``sample(n, generator)`` draws n examples uniformly with replacement: (x (n, ...), y (n,)
    int64 class indices 0..C-1). All randomness comes from ``generator``, so a checkpointed
    generator state resumes the same sequence of batches.
    """

    def __init__(self, examples: torch.Tensor):
        check_tensor("examples", examples)
        check_floating("examples", examples)
        check_min_dim("examples", examples, 3, "(C classes, D examples, ...)")
        if examples.shape[0] == 0 or examples.shape[1] == 0:
            raise ValueError(
                f"examples: expected at least one class and one example per class, "
                f"received shape {tuple(examples.shape)}"
            )
        self.examples = examples
        self.num_classes, self.per_class = examples.shape[:2]

    def sample(self, n: int, generator: torch.Generator | None = None):
        check_positive_int("n", n)
        index = torch.randint(self.num_classes * self.per_class, (n,), generator=generator)
        x = self.examples.flatten(0, 1)[index]
        return x, (index // self.per_class).to(self.examples.device)


def pretrain(
    model: Pretrained,
    examples: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    iterations: int,
    batch_size: int,
    generator: torch.Generator,
    **train_kwargs,
) -> History:
    """Supervised pretraining on all classes: steps start_step .. iterations - 1.

    The loop is ``pymeta.training.meta_train``'s (progress bar, logging, validation,
    checkpoints that resume exactly), minimising ``model.pretrain_loss`` on ``ClassBatches``.

    Args:
        model: a Pretrained with loss "cross_entropy" whose network outputs C logits.
        examples: (C, D, ...) floating tensor; the label of ``examples[c, d]`` is c.
        optimizer: over ``model.parameters()``.
        iterations: total steps (including those before ``start_step``).
        batch_size: examples per step.
        generator: draws the batches (save its state in checkpoints).
        train_kwargs: ``start_step``, ``history``, ``validate``, ``val_every``,
            ``train_accuracy`` (of a batch ``(x, y)``), ``log_every``, ``checkpoint``,
            ``checkpoint_every``, ``progress``: as in ``meta_train``.

    Returns:
        The History: ``meta_loss`` holds the running training loss.
    """
    if not isinstance(model, Pretrained):
        raise TypeError(
            f"model: expected a pymeta.baselines.Pretrained, received {type(model).__name__}"
        )
    if not (model.loss.builtin and model.loss.name == "cross_entropy"):
        raise ValueError(
            f"model: expected loss 'cross_entropy' (labels are class indices), "
            f"received {model.loss.name!r}"
        )
    check_positive_int("iterations", iterations)
    return meta_train(
        model,
        optimizer,
        ClassBatches(examples),
        iterations=iterations,
        meta_batch=check_positive_int("batch_size", batch_size),
        task_generator=generator,
        loss_fn=lambda batch: model.pretrain_loss(*batch),
        desc="pretraining",
        **train_kwargs,
    )
