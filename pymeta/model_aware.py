"""Model-aware MAML: the whole inner loop and the exact meta-gradient in the compiled core."""

from __future__ import annotations

import math

import torch
from torch import nn

from pymeta._checks import (
    check_positive_int,
    check_same_device,
    check_tensor,
    support_as_batch,
)
from pymeta._ops import HAS_COMPILED_CORE
from pymeta.adapted import AdaptedModel
from pymeta.losses import LOSS_NAMES, TaskLoss
from pymeta.mlp_spec import MlpSpec
from pymeta.task_batch import TaskBatch
from pymeta.task_forward import TaskForward

LR_MODES = ("scalar", "per_layer_step", "per_parameter")
_LR_MODE_CODES = {"scalar": 0, "per_layer_step": 1, "per_parameter": 2}


class ModelAwareMAML(nn.Module):
    """MAML for MLPs with the inner loop and the exact meta-gradient in the compiled core.

    For every task of a meta-batch, one call into the core runs the inner SGD steps on the
    support set, the query losses, and the meta-gradient by a reverse sweep over the inner
    steps with Hessian-vector products (forward-over-reverse), with no Python autograd graph.
    With every layer adaptive, one scalar rate and no extras it gives the same losses and
    meta-gradients as ``pymeta.MAML``.

    Args:
        model: an ``nn.Sequential`` (nested ones are flattened) of Linear, ReLU, LeakyReLU,
            Tanh, Sigmoid, Flatten and Identity layers; each Linear followed by at most one
            activation. Anything else raises an error pointing to ``pymeta.MAML``.
        inner_lr: initial inner learning rate α (finite, >= 0).
        inner_steps: inner steps per task.
        first_order: drop second-order terms (FOMAML).
        loss: "mse" or "cross_entropy" (int64 class targets).
        adapt_layers: None (all Linear layers adapt), "head" (the last one, as in ANIL), or a
            list of ``model[i]`` indices of Linear layers. Frozen layers keep their
            meta-gradients.
        lr_mode: "scalar" (one rate), "per_layer_step" (one per adapted layer and inner step,
            as in MAML++), "per_parameter" (one per element of each adapted parameter, as in
            Meta-SGD).
        learn_inner_lr: whether the rates are meta-parameters. For parity with
            ``pymeta.MAML``, "scalar" or "per_parameter" here means True with that lr_mode.
        multi_step_loss: False (query loss after the last step only), True (mean of the query
            losses after every step) or a sequence of ``inner_steps`` weights (MAML++).

    Shapes: support_x (T, K, ...), query_x (T, Q, ...); with a leading ``nn.Flatten`` the
    per-example shape is flattened. Targets: (T, K, out) floats for MSE, (T, K) int64 for
    cross-entropy. CPU tensors, float32 or float64.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        first_order: bool = False,
        loss: str = "mse",
        adapt_layers=None,
        lr_mode: str = "scalar",
        learn_inner_lr=False,
        multi_step_loss=False,
    ):
        super().__init__()
        if not HAS_COMPILED_CORE:
            raise RuntimeError(
                "ModelAwareMAML runs in pymeta's compiled core, which failed to load (see the "
                "warning at import); reinstall with `pip install --no-build-isolation -e .`, or "
                "use pymeta.MAML"
            )
        self.spec = MlpSpec.from_module(model)
        self.module = model
        self.inner_steps = check_positive_int("inner_steps", inner_steps)
        self.first_order = bool(first_order)
        if loss not in LOSS_NAMES:
            raise ValueError(f"loss: expected one of {LOSS_NAMES}, received {loss!r}")
        self.loss = TaskLoss(loss)
        if isinstance(learn_inner_lr, str):
            if learn_inner_lr not in ("scalar", "per_parameter"):
                raise ValueError(
                    "learn_inner_lr: expected a bool, 'scalar' or 'per_parameter', received "
                    f"{learn_inner_lr!r}"
                )
            lr_mode, learn_inner_lr = learn_inner_lr, True
        if not isinstance(learn_inner_lr, bool):
            raise TypeError(f"learn_inner_lr: expected a bool, received {learn_inner_lr!r}")
        if lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode: expected one of {LR_MODES}, received {lr_mode!r}")
        if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
            raise TypeError(f"inner_lr: expected a number, received {type(inner_lr).__name__}")
        if not math.isfinite(inner_lr) or inner_lr < 0:
            raise ValueError(f"inner_lr: expected a finite number >= 0, received {inner_lr!r}")
        self.lr_mode = lr_mode
        self.learn_inner_lr = learn_inner_lr
        self.adapted = self.spec.resolve_adapted(adapt_layers)
        self.step_weights = self._resolve_step_weights(multi_step_loss)
        self._layer_codes, self._activation_args = [], []
        for layer, adapted in zip(self.spec.layers, self.adapted):
            self._layer_codes += [layer.activation, int(layer.bias_name is not None), int(adapted)]
            self._activation_args.append(layer.slope)
        self._make_lrs(float(inner_lr))
        self._forward = TaskForward(model, "auto")

    # ------------------------------------------------------------------ construction helpers
    def _resolve_step_weights(self, multi_step_loss) -> list[float]:
        steps = self.inner_steps
        if multi_step_loss is False:
            return [0.0] * (steps - 1) + [1.0]
        if multi_step_loss is True:
            return [1.0 / steps] * steps
        try:
            weights = [float(w) for w in multi_step_loss]
        except TypeError:
            raise TypeError(
                "multi_step_loss: expected a bool or a sequence of weights, received "
                f"{multi_step_loss!r}"
            ) from None
        if len(weights) != steps or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"multi_step_loss: expected {steps} finite weights (one per inner step), "
                f"received {weights}"
            )
        return weights

    def _adapted_params(self) -> list[nn.Parameter]:
        out = []
        for layer, adapted in zip(self.spec.layers, self.adapted):
            if adapted:
                out.append(layer.linear.weight)
                if layer.linear.bias is not None:
                    out.append(layer.linear.bias)
        return out

    def _make_lrs(self, init: float) -> None:
        # A child module registered after the model, so parameters() lists the model's
        # parameters first and the learned rates last, as pymeta.MAML does.
        self.inner_lr = nn.Module()
        ref = self.spec.layers[0].linear.weight

        def make(t: torch.Tensor):
            return nn.Parameter(t) if self.learn_inner_lr else t

        if self.lr_mode == "per_parameter":
            lrs = [make(torch.full_like(p.detach(), init)) for p in self._adapted_params()]
            if self.learn_inner_lr:
                self.inner_lr.lrs = nn.ParameterList(lrs)
            else:
                for i, lr in enumerate(lrs):
                    self.inner_lr.register_buffer(f"lr_{i}", lr)
            return
        shape = () if self.lr_mode == "scalar" else (self.inner_steps, sum(self.adapted))
        lr = torch.full(shape, init, dtype=ref.dtype, device=ref.device)
        if self.learn_inner_lr:
            self.inner_lr.lr = nn.Parameter(lr)
        else:
            self.inner_lr.register_buffer("lr", lr)

    def inner_lrs(self) -> list[torch.Tensor]:
        """The rates as the core takes them: [()] for "scalar", [(steps, n_adapted_layers)]
        for "per_layer_step", one tensor per adapted parameter for "per_parameter"."""
        if self.lr_mode != "per_parameter":
            return [self.inner_lr.lr]
        if self.learn_inner_lr:
            return list(self.inner_lr.lrs)
        return [getattr(self.inner_lr, f"lr_{i}") for i in range(len(self._adapted_params()))]

    def _params(self) -> list[torch.Tensor]:
        named = dict(self.module.named_parameters())
        return [named[n] for n in self.spec.param_names]

    # ------------------------------------------------------------------ public API
    def forward(self, *args, **kwargs):
        """Runs the (unadapted) meta-model."""
        return self.module(*args, **kwargs)

    def meta_loss(self, batch: TaskBatch) -> torch.Tensor:
        """Mean over tasks of the (weighted) query loss after adapting on the support set.

        Args:
            batch: a TaskBatch: support (T, K, ...), query (T, Q, ...).

        Returns:
            A scalar; ``.backward()`` fills ``.grad`` of every meta-parameter with the exact
            meta-gradient computed by the core (it cannot be differentiated again).
        """
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch: expected a pymeta.TaskBatch, received {type(batch).__name__}")
        sx = self._inputs("batch.support_x", batch.support_x)
        qx = self._inputs("batch.query_x", batch.query_x)
        sy = self._targets("batch.support_y", batch.support_y)
        qy = self._targets("batch.query_y", batch.query_y)
        loss, _, _, _ = torch.ops.pymeta.mlp_maml_loss(
            *self._core_args(sx, sy, qx, qy), False, False
        )
        return loss

    def _core_args(self, sx, sy, qx, qy, params=None, lrs=None) -> tuple:
        """The arguments of ``torch.ops.pymeta.mlp_maml_loss`` up to ``first_order``, for
        checked (T, K, features) inputs; params and lrs default to this learner's own."""
        return (
            self._params() if params is None else params,
            self.inner_lrs() if lrs is None else lrs,
            sx, sy, qx, qy, self._layer_codes, self._activation_args, self.step_weights,
            _LR_MODE_CODES[self.lr_mode], self._loss_code(), self.first_order,
        )  # fmt: skip

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        batched: bool | None = None,
    ) -> AdaptedModel:
        """Fast adaptation in the compiled core (no graph, meta-parameters untouched).

        Args:
            support_x: (K, ...) for one task or (T, K, ...) for a batch.
            support_y: (K, ...) or (T, K, ...) targets.
            steps: inner steps (default ``inner_steps``; at most ``inner_steps`` with
                ``lr_mode="per_layer_step"``, whose rates are per step).
            batched: whether the inputs carry a task dimension; inferred from the first Linear
                layer's input when None.

        Returns:
            An AdaptedModel: ``adapted(query_x)`` gives (Q, ...) or (T, Q, ...) predictions.
        """
        check_tensor("support_x", support_x)
        check_tensor("support_y", support_y)
        steps = self.inner_steps if steps is None else check_positive_int("steps", steps)
        lrs = [lr.detach() for lr in self.inner_lrs()]
        if self.lr_mode == "per_layer_step":
            if steps > self.inner_steps:
                raise ValueError(
                    f"steps: per_layer_step rates exist for {self.inner_steps} steps, "
                    f"received {steps}"
                )
            lrs = [lrs[0][:steps]]
        if batched is None:
            if self.spec.flatten_input:
                features = self.spec.layers[0].linear.in_features
                batched = support_x.dim() >= 3 and math.prod(support_x.shape[2:]) == features
            else:
                batched = support_x.dim() == 3
        support_x, support_y = support_as_batch(support_x, support_y, batched)
        sx = self._inputs("support_x", support_x)
        sy = self._targets("support_y", support_y)
        params = [p.detach() for p in self._params()]
        adapted = torch.ops.pymeta.mlp_adapt(
            params, lrs, sx, sy, self._layer_codes, self._activation_args, steps,
            _LR_MODE_CODES[self.lr_mode], self._loss_code(),
        )  # fmt: skip
        named = dict(zip(self.spec.param_names, adapted))
        return AdaptedModel(self._forward, named, {}, batched, None)

    # ------------------------------------------------------------------ checks
    def _loss_code(self) -> int:
        return 0 if self.loss.name == "mse" else 1

    def _inputs(self, name: str, x: torch.Tensor) -> torch.Tensor:
        ref = self.spec.layers[0].linear.weight
        check_same_device(name, x, ref.device, "the model's parameters")
        if ref.device.type != "cpu":
            raise ValueError(
                f"{name}: ModelAwareMAML runs on CPU tensors in this version, received "
                f"{x.device}; use pymeta.MAML on other devices"
            )
        if x.dtype != ref.dtype or x.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{name}: expected dtype {ref.dtype} like the model's parameters (float32 or "
                f"float64), received {x.dtype}"
            )
        if self.spec.flatten_input:
            x = x.reshape(*x.shape[:2], -1)
        features = self.spec.layers[0].linear.in_features
        if x.dim() != 3 or x.shape[2] != features:
            raise ValueError(
                f"{name}: expected (T, K, {features}) inputs for the first Linear layer, "
                f"received shape {tuple(x.shape)}"
            )
        return x

    def _targets(self, name: str, y: torch.Tensor) -> torch.Tensor:
        self.loss.check_targets(name, y, batched=True)
        out = self.spec.layers[-1].linear.out_features
        if self.loss.name == "mse" and (y.dim() != 3 or y.shape[2] != out):
            raise ValueError(
                f"{name}: mse expects targets (T, K, {out}) like the model's output, received "
                f"shape {tuple(y.shape)}"
            )
        if self.loss.name == "cross_entropy" and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= out:
                raise ValueError(
                    f"{name}: expected class indices in [0, {out}), received values in [{lo}, {hi}]"
                )
        return y
