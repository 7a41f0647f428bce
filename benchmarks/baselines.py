"""Reference MAML implementations in plain PyTorch: the comparison points for pymeta.MAML.

These are the two ways a skilled user would write MAML without pymeta:

* ``PerTaskLoopMAML``: the textbook loop over tasks with ``torch.autograd.grad``
  (``create_graph=True`` for second order) and ``torch.func.functional_call``.
* ``TorchFuncMAML``: the idiomatic ``torch.func`` version, ``vmap`` over tasks of an inner
  loop written with ``torch.func.grad``.

Both compute the same meta-loss as ``pymeta.MAML.meta_loss`` (mean over tasks of the query
loss after ``inner_steps`` SGD steps on the support set) so that ``.backward()`` gives the
meta-gradients in ``model.parameters()``. ``benchmarks/test_baselines_agree.py`` checks that
all three agree; ``benchmarks/test_meta_step.py`` and ``benchmarks/compare.py`` time them.

Only what the benchmarks need is supported: fixed scalar inner learning rate, "mse" or
"cross_entropy" loss, parameters with ``requires_grad=False`` held fixed.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

_LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


class _BaselineMAML:
    """Shared constructor and argument handling of the two baselines."""

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str = "mse",
    ):
        if loss not in _LOSSES:
            raise ValueError(f"loss: expected one of {tuple(_LOSSES)}, received {loss!r}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.first_order = bool(first_order)
        self.loss_fn = _LOSSES[loss]

    def _adapted_params(self) -> dict[str, torch.Tensor]:
        # Frozen parameters are left to the module itself, as pymeta.MAML does.
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def meta_loss(self, batch) -> torch.Tensor:
        raise NotImplementedError

    __call__ = meta_loss


class PerTaskLoopMAML(_BaselineMAML):
    """MAML with a Python loop over tasks and ``torch.autograd.grad`` in the inner loop."""

    def meta_loss(self, batch) -> torch.Tensor:
        meta_params = self._adapted_params()
        create_graph = not self.first_order
        query_losses = []
        for t in range(batch.num_tasks):
            params = meta_params
            for _ in range(self.inner_steps):
                pred = functional_call(self.model, params, (batch.support_x[t],))
                loss = self.loss_fn(pred, batch.support_y[t])
                # Without create_graph the gradients are constants, so the update's derivative
                # is the identity: exactly first-order MAML.
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
                params = {
                    n: p - self.inner_lr * g
                    for (n, p), g in zip(params.items(), grads, strict=True)
                }
            pred = functional_call(self.model, params, (batch.query_x[t],))
            query_losses.append(self.loss_fn(pred, batch.query_y[t]))
        return torch.stack(query_losses).mean()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """Image batches and convolution weights in the channels-last layout (differentiably)."""
    return t.to(memory_format=torch.channels_last) if t.dim() == 4 else t


class ChannelsLastPerTaskLoopMAML(PerTaskLoopMAML):
    """The per-task loop with images and convolution weights in the channels-last layout.

    The layout pymeta.ModelAwareMAML's core uses on the CPU: a fairness check that separates
    what the layout gains from what the core itself gains (benchmarks/omniglot_step.py).
    """

    def _adapted_params(self) -> dict[str, torch.Tensor]:
        return {n: _channels_last(p) for n, p in super()._adapted_params().items()}

    def meta_loss(self, batch) -> torch.Tensor:
        # The loop indexes batch.<field>[t]: hand it per-task channels-last tensors.
        fields = ("support_x", "support_y", "query_x", "query_y")
        per_task = {f: [_channels_last(t) for t in getattr(batch, f)] for f in fields}
        return super().meta_loss(SimpleNamespace(num_tasks=batch.num_tasks, **per_task))


class TorchFuncMAML(_BaselineMAML):
    """MAML as ``vmap`` over tasks of an inner loop written with ``torch.func.grad``.

    The outer ``.backward()`` is ordinary autograd: torch.func transforms compose with it, so
    the meta-gradient flows through ``torch.func.grad`` (second order) unless the inner
    gradients are detached (first order).
    """

    def meta_loss(self, batch) -> torch.Tensor:
        model, loss_fn = self.model, self.loss_fn
        lr, steps, first_order = self.inner_lr, self.inner_steps, self.first_order

        def task_loss(params, x, y):
            return loss_fn(functional_call(model, params, (x,)), y)

        inner_grad = grad(task_loss)

        def one_task(params, support_x, support_y, query_x, query_y):
            for _ in range(steps):
                grads = inner_grad(params, support_x, support_y)
                if first_order:
                    grads = {n: g.detach() for n, g in grads.items()}
                params = {n: params[n] - lr * grads[n] for n in params}
            return task_loss(params, query_x, query_y)

        # Meta-parameters are shared by all tasks (in_dims None); the data is split by task.
        per_task = vmap(one_task, in_dims=(None, 0, 0, 0, 0))(
            self._adapted_params(), batch.support_x, batch.support_y, batch.query_x, batch.query_y
        )
        return per_task.mean()
