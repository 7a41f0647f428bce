"""Inner-loop learning rates: fixed, one learned scalar, or learned per parameter (Meta-SGD)."""

from __future__ import annotations

import math

import torch
from torch import nn

LR_MODES = (False, True, "scalar", "per_parameter")


class InnerLR(nn.Module):
    """The inner learning rate(s) of a MAML learner.

    Args:
        init: initial value (finite, >= 0).
        mode: False (fixed, a buffer), True or "scalar" (one learned scalar), or
            "per_parameter" (one learned rate per element of every adapted parameter).
        params: the adapted parameters, in order; per-parameter rates copy their shapes.
    """

    def __init__(self, init: float, mode, params: list[torch.Tensor]):
        super().__init__()
        if (
            isinstance(init, bool)
            or not isinstance(init, (int, float))
            or not math.isfinite(init)
            or init < 0
        ):
            raise ValueError(f"inner_lr: expected a finite number >= 0, received {init!r}")
        if mode not in LR_MODES:
            raise ValueError(f"learn_inner_lr: expected one of {LR_MODES}, received {mode!r}")
        ref = params[0]
        self.mode = "scalar" if mode is True else mode
        if self.mode is False:
            self.register_buffer(
                "lr", torch.tensor(float(init), dtype=ref.dtype, device=ref.device)
            )
        elif self.mode == "scalar":
            self.lr = nn.Parameter(torch.tensor(float(init), dtype=ref.dtype, device=ref.device))
        else:
            self.lrs = nn.ParameterList(
                [nn.Parameter(torch.full_like(p, float(init))) for p in params]
            )

    @property
    def learned(self) -> bool:
        return self.mode is not False

    def as_list(self) -> list[torch.Tensor]:
        """The rates in the form ``sgd_update`` takes: [shared scalar] or one tensor per param."""
        if self.mode == "per_parameter":
            return list(self.lrs)
        return [self.lr]
