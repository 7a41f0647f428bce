"""MAML written with third-party meta-learning libraries, the way each library's own examples
write it: learn2learn, higher and torchopt.

Each class takes pymeta.MAML's arguments and computes the same meta-loss as
``baselines.PerTaskLoopMAML`` (tasks one at a time), so ``.backward()`` gives the
meta-gradients. The library is imported when a class is instantiated: ``workloads.available``
tells whether it is installed, and the benchmarks skip the missing ones.
"""

from __future__ import annotations

import torch
from baselines import _BaselineMAML
from torch import nn
from torch.func import functional_call


class Learn2LearnMAML(_BaselineMAML):
    """``learn2learn.algorithms.MAML``: ``clone()`` then ``adapt(loss)`` per task."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        import learn2learn as l2l

        self.maml = l2l.algorithms.MAML(model, lr=self.inner_lr, first_order=self.first_order)

    def meta_loss(self, batch) -> torch.Tensor:
        query_losses = []
        for t in range(batch.num_tasks):
            learner = self.maml.clone()
            for _ in range(self.inner_steps):
                learner.adapt(self.loss_fn(learner(batch.support_x[t]), batch.support_y[t]))
            query_losses.append(self.loss_fn(learner(batch.query_x[t]), batch.query_y[t]))
        return torch.stack(query_losses).mean()


class HigherMAML(_BaselineMAML):
    """``higher.innerloop_ctx`` around plain SGD, one context per task.

    ``copy_initial_weights=False`` makes the fast weights start from (and differentiate to)
    the model's own parameters. higher always differentiates the inner step
    (``create_graph=True``); first order follows higher's documented route of detaching the
    inner gradients in ``grad_callback``, so it still pays for building that graph.
    """

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        import higher

        self._higher = higher
        self.inner_opt = torch.optim.SGD(model.parameters(), lr=self.inner_lr)
        self._grad_callback = (lambda gs: [g.detach() for g in gs]) if self.first_order else None

    def meta_loss(self, batch) -> torch.Tensor:
        query_losses = []
        for t in range(batch.num_tasks):
            with self._higher.innerloop_ctx(
                self.model, self.inner_opt, copy_initial_weights=False
            ) as (fmodel, diffopt):
                for _ in range(self.inner_steps):
                    loss = self.loss_fn(fmodel(batch.support_x[t]), batch.support_y[t])
                    diffopt.step(loss, grad_callback=self._grad_callback)
                query_losses.append(self.loss_fn(fmodel(batch.query_x[t]), batch.query_y[t]))
        return torch.stack(query_losses).mean()


class TorchOptMAML(_BaselineMAML):
    """torchopt's functional API: ``torchopt.sgd`` with ``update(..., inplace=False)`` and
    ``apply_updates(..., inplace=False)`` on a parameter dict, one task at a time."""

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        import torchopt

        self._torchopt = torchopt
        self.inner_opt = torchopt.sgd(lr=self.inner_lr)

    def meta_loss(self, batch) -> torch.Tensor:
        torchopt, opt = self._torchopt, self.inner_opt
        meta_params = self._adapted_params()
        query_losses = []
        for t in range(batch.num_tasks):
            params = meta_params
            state = opt.init(params)
            for _ in range(self.inner_steps):
                pred = functional_call(self.model, params, (batch.support_x[t],))
                loss = self.loss_fn(pred, batch.support_y[t])
                grads = torch.autograd.grad(
                    loss, list(params.values()), create_graph=not self.first_order
                )
                grads = dict(zip(params, grads, strict=True))
                updates, state = opt.update(grads, state, inplace=False)
                params = torchopt.apply_updates(params, updates, inplace=False)
            pred = functional_call(self.model, params, (batch.query_x[t],))
            query_losses.append(self.loss_fn(pred, batch.query_y[t]))
        return torch.stack(query_losses).mean()
