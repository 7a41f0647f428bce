"""Per-step batch norm running statistics (MAML++): what every batch norm layer of a
model-aware network normalised with at each inner step, averaged over meta-training, so that an
adapted network can predict without batch statistics (one query example at a time)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pymeta.model_aware.encoding import BATCHNORM_INTS


class BnRunningStats(nn.Module):
    """Running means and variances of every batch norm layer, one row per inner step.

    In meta-training the core normalises with batch statistics (the MAML convention) and
    reports them (``net_maml_loss``'s ``bn_stats``); ``update`` averages them over the tasks of
    the meta-batch and folds them into the running values with each layer's ``momentum`` (an
    exponential average, or the cumulative average when the layer's momentum is None), as
    ``nn.BatchNorm`` does with its batches.

    Buffers:
        running_mean, running_var: (steps + 1, C), the layers' channels concatenated in layer
            order. Row j < steps: the support set at inner step j; row ``steps``: the query set
            after the last step. running_var holds unbiased variances, like ``nn.BatchNorm``.
        num_batches_tracked: () int64, the meta-batches averaged so far.
    """

    def __init__(self, layers: list, steps: int, like: torch.Tensor):
        super().__init__()
        self.layer_names = [layer.name for layer in layers]
        self.channels = [layer.ints[BATCHNORM_INTS["channels"]] for layer in layers]
        self.momenta = [layer.module.momentum for layer in layers]
        width = sum(self.channels)
        options = {"dtype": like.dtype, "device": like.device}
        self.register_buffer("running_mean", torch.zeros(steps + 1, width, **options))
        self.register_buffer("running_var", torch.ones(steps + 1, width, **options))
        self.register_buffer(
            "num_batches_tracked", torch.zeros((), dtype=torch.long, device=like.device)
        )

    @torch.no_grad()
    def update(self, bn_stats: torch.Tensor) -> None:
        """Folds one meta-batch's statistics in.

        Args:
            bn_stats: (T, steps + 1, 2, C) per-task means ([..., 0, :]) and unbiased variances
                ([..., 1, :]); rows holding NaN (a query pass skipped by a zero step weight)
                are left as they are.
        """
        stats = bn_stats.mean(0).to(self.running_mean.dtype)
        rows = torch.isfinite(stats).flatten(1).all(1)
        count = int(self.num_batches_tracked) + 1
        factor = torch.cat(
            [
                torch.full((c,), 1.0 / count if m is None else float(m))
                for c, m in zip(self.channels, self.momenta)
            ]
        ).to(self.running_mean)
        self.running_mean[rows] = torch.lerp(self.running_mean[rows], stats[rows, 0], factor)
        self.running_var[rows] = torch.lerp(self.running_var[rows], stats[rows, 1], factor)
        self.num_batches_tracked += 1

    def layer_stats(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer name -> (running mean (C_l,), running variance (C_l,)) at inner step ``step``."""
        means = self.running_mean[step].split(self.channels)
        variances = self.running_var[step].split(self.channels)
        return dict(zip(self.layer_names, zip(means, variances)))

    def inference_module(self, module: nn.Module, step: int) -> nn.Module:
        """A copy of ``module`` in eval mode whose batch norm layers normalise with the running
        statistics of inner step ``step`` instead of the batch's (the copy's parameters are
        replaced by the adapted ones when it runs)."""
        if int(self.num_batches_tracked) == 0:
            raise RuntimeError(
                "bn_stats='running': no running statistics yet; they are averaged by "
                "meta_loss in training mode"
            )
        frozen = copy.deepcopy(module)
        for name, (mean, var) in self.layer_stats(step).items():
            bn = frozen.get_submodule(name)
            bn.track_running_stats = True
            bn.register_buffer("running_mean", mean.clone())
            bn.register_buffer("running_var", var.clone())
            bn.register_buffer("num_batches_tracked", self.num_batches_tracked.clone())
        return frozen.eval()
