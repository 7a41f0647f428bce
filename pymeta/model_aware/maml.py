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
from pymeta.model_aware.bn_running_stats import BnRunningStats
from pymeta.model_aware.encoding import KINDS, LOSSES
from pymeta.model_aware.encoding import LR_MODES as _LR_MODE_CODES
from pymeta.model_aware.net_spec import NetSpec
from pymeta.task_batch import TaskBatch
from pymeta.task_forward import TaskForward, call_module

LR_MODES = ("scalar", "per_layer_step", "per_parameter")


class ModelAwareMAML(nn.Module):
    """MAML with the inner loop and the exact meta-gradient in the compiled core.

    For every task of a meta-batch, one call into the core runs the inner SGD steps on the
    support set, the query losses, and the meta-gradient by a reverse sweep over the inner
    steps with Hessian-vector products (forward-over-reverse), with no Python autograd graph.
    With every layer adaptive, one scalar rate and no extras it gives the same losses and
    meta-gradients as ``pymeta.MAML``.

    Args:
        model: any module whose ``torch.fx`` trace uses only supported operations. MLPs (an
            ``nn.Sequential`` of Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Flatten, Identity;
            each Linear followed by at most one activation) run in the core's fused MLP
            kernels. Other networks run in its layered kernels: Linear, Conv2d, BatchNorm1d/2d
            (batch statistics, ``track_running_stats=False``, the MAML convention), the
            activations (modules or ``F.relu``-style functions), MaxPool2d, AvgPool2d,
            AdaptiveAvgPool2d(1), Flatten / ``x.view(x.size(0), -1)``, the residual add of two
            branches (``out = self.body(x) + self.shortcut(x)``) and ``torch.cat`` along the
            channels; e.g. ``pymeta.models.conv4`` and ``pymeta.models.resnet12``. Anything
            else raises an error naming the node and pointing to ``pymeta.MAML``, and so does
            what the core would not reproduce exactly: forward/backward hooks (module or global,
            also when added after construction), subclasses of the layer types, a layer with
            parameters or batch norm called twice, tied parameters, a forward that traces
            differently from one call to the next, and a layer with some parameters frozen and
            some not. A parameterless layer (activation, pooling, Flatten) may be used more
            than once.
            Layers whose parameters all have ``requires_grad=False`` stay fixed and get no
            gradient, as in ``pymeta.MAML``. The model is read at construction: swapping a
            layer or changing requires_grad afterwards is an error at the next call.
        inner_lr: initial inner learning rate α (finite, >= 0).
        inner_steps: inner steps per task.
        first_order: drop second-order terms (FOMAML).
        loss: "mse" or "cross_entropy" (int64 class targets in [0, classes); cross-entropy's
            ignore_index -100 is refused, as by ``pymeta.MAML``).
        adapt_layers: None (every layer with parameters adapts), "head" (the last Linear, as
            in ANIL), or a list of layers with parameters: module names (``"0.body.3"``) or,
            for ``nn.Sequential`` models, ``model[i]`` indices. Layers that
            do not adapt keep their meta-gradients. Frozen layers (requires_grad=False) never
            adapt; naming one here is an error.
        lr_mode: "scalar" (one rate), "per_layer_step" (one per adapted layer and inner step,
            as in MAML++), "per_parameter" (one per element of each adapted parameter, as in
            Meta-SGD).
        learn_inner_lr: whether the rates are meta-parameters. For parity with
            ``pymeta.MAML``, "scalar" or "per_parameter" here means True with that lr_mode.
        multi_step_loss: False (query loss after the last step only), True (mean of the query
            losses after every step) or a sequence of ``inner_steps`` weights (MAML++).
        per_step_bn: give every affine batch norm layer its own weight and bias per inner step
            (MAML++): meta-learned (steps + 1, C) parameters in ``self.bn_steps``, row j used
            at inner step j and row ``inner_steps`` for the query after the last step. They
            replace the module's own batch norm weights, which then get no gradient.
        track_bn_stats: keep per-step running statistics of every batch norm layer (MAML++):
            ``meta_loss`` in training mode averages the batch statistics the core normalised
            with at each inner step into ``self.bn_running_stats`` (a ``BnRunningStats``:
            (inner_steps + 1, C) buffers, each layer's ``momentum``), and
            ``adapt(..., bn_stats="running")`` predicts with them instead of the batch's.
            Training itself always uses batch statistics.

    Shapes: support_x (T, K, ...), query_x (T, Q, ...), with ... what one example is for the
    model (e.g. (C, H, W) for conv4, (features,) for an MLP). Targets: floats shaped like the
    model's output (T, K, ...) for MSE, (T, K) int64 class indices for cross-entropy. CPU
    tensors, float32 or float64.
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
        per_step_bn: bool = False,
        track_bn_stats: bool = False,
    ):
        super().__init__()
        if not HAS_COMPILED_CORE:
            raise RuntimeError(
                "ModelAwareMAML runs in pymeta's compiled core, which failed to load (see the "
                "warning at import); reinstall with `pip install --no-build-isolation -e .`, or "
                "use pymeta.MAML"
            )
        if not isinstance(per_step_bn, bool):
            raise TypeError(f"per_step_bn: expected a bool, received {per_step_bn!r}")
        self.spec = NetSpec.from_module(model, per_step_bn)
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
        self._requires_grad = self._trainable_layers()
        self.adapted = self._resolve_adapted(adapt_layers)
        self.step_weights = self._resolve_step_weights(multi_step_loss)
        self._layer_codes, self._layer_args = self.spec.core_layers(self.adapted)
        self._make_lrs(float(inner_lr))
        self._make_step_bn()
        self._make_bn_running_stats(track_bn_stats)
        self._forward = TaskForward(model, "auto")
        self._output_shapes: dict = {}

    @property
    def core_kind(self) -> str:
        """ "mlp" when the core runs this network on its MLP fast path (CPU, an nn.Sequential
        of Linear layers each followed by at most one activation), else "layered"."""
        from pymeta import _C  # loaded: the constructor checked HAS_COMPILED_CORE

        return "mlp" if _C.mlp_fast_path_applies(self._layer_codes) else "layered"

    # ------------------------------------------------------------------ construction helpers
    def _resolve_step_weights(self, multi_step_loss) -> list[float]:
        steps = self.inner_steps
        if multi_step_loss is False:
            return [0.0] * (steps - 1) + [1.0]
        if multi_step_loss is True:
            return [1.0 / steps] * steps
        try:
            weights = [float(w) for w in multi_step_loss]
        except (TypeError, ValueError):  # not iterable, or a weight that is not a number
            raise TypeError(
                "multi_step_loss: expected a bool or a sequence of weights, received "
                f"{multi_step_loss!r}"
            ) from None
        if len(weights) != steps or not all(math.isfinite(w) for w in weights):
            raise ValueError(
                f"multi_step_loss: expected {steps} finite weights (one per inner step), "
                f"received {weights}"
            )
        # All-zero weights would make the meta-loss 0 whatever the network (nothing to learn),
        # and a negative weight maximises a query loss: both are mistakes, not options.
        if min(weights) < 0 or not any(weights):
            raise ValueError(
                "multi_step_loss: expected weights >= 0, at least one of them positive, "
                f"received {weights}"
            )
        return weights

    def _param_layers(self) -> list:
        return self.spec.parametric_layers

    @staticmethod
    def _layer_where(layer) -> str:
        return f"model.{layer.weight_name.rsplit('.', 1)[0]} ({type(layer.module).__name__})"

    @staticmethod
    def _layer_label(layer) -> str:
        """model[i] for nn.Sequential models, model.<name> for others."""
        where = f"[{layer.position}]" if layer.position is not None else f".{layer.name}"
        return f"model{where} ({type(layer.module).__name__})"

    def _trainable_layers(self) -> list[bool]:
        """Per parametric layer: whether its parameters have requires_grad (a layer must be
        all frozen or all trainable: the core adapts whole layers)."""
        out = []
        for layer in self._param_layers():
            held = layer.module._parameters  # read directly: nn.Module.__getattr__ costs per call
            flags = {"weight": held["weight"].requires_grad}
            if layer.bias_name:
                flags["bias"] = held["bias"].requires_grad
            if flags.get("bias", flags["weight"]) != flags["weight"]:
                frozen = [a for a, f in flags.items() if not f]
                trained = [a for a, f in flags.items() if f]
                raise ValueError(
                    f"{self._layer_where(layer)}: {', '.join(frozen)} has requires_grad=False "
                    f"but {', '.join(trained)} has requires_grad=True; ModelAwareMAML adapts "
                    "whole layers, so freeze all of a layer's parameters or none, or use "
                    "pymeta.MAML (which adapts each parameter that requires grad)"
                )
            out.append(all(flags.values()))
        return out

    def _resolve_adapted(self, adapt_layers) -> list[bool]:
        """Which parametric layers adapt. As in pymeta.MAML, frozen layers (requires_grad=False)
        are neither adapted nor meta-learned; naming one in adapt_layers is an error."""
        trainable = self._requires_grad
        if not any(trainable):
            raise ValueError(
                "model: expected at least one parameter with requires_grad=True, received none"
            )
        adapted = self.spec.resolve_adapted(adapt_layers)
        if adapt_layers is None:
            adapted = [a and t for a, t in zip(adapted, trainable)]
        for layer, a, t in zip(self._param_layers(), adapted, trainable):
            if a and not t:
                raise ValueError(
                    f"adapt_layers: {self._layer_label(layer)} is frozen (requires_grad=False); "
                    "frozen layers are not adapted"
                )
        if not any(adapted):
            raise ValueError(
                "adapt_layers: expected at least one trainable layer to adapt, received none"
            )
        return adapted

    def _check_model(self) -> None:
        """Hooks, swapped layers or changed requires_grad since construction would make the core
        compute a network other than the module's: refused (cheap: a walk over the layers)."""
        self.spec.check_unchanged(self.module)
        now = self._trainable_layers()
        for layer, was, is_ in zip(self._param_layers(), self._requires_grad, now):
            if was != is_:
                raise ValueError(
                    f"{self._layer_where(layer)}: requires_grad changed since construction "
                    f"(was {was}, now {is_}); build a new ModelAwareMAML"
                )

    def _adapted_params(self) -> list[nn.Parameter]:
        named = dict(self.module.named_parameters())
        out = []
        for layer, adapted in zip(self._param_layers(), self.adapted):
            if adapted:
                out += [named[n] for n in (layer.weight_name, layer.bias_name) if n]
        return out

    def _make_step_bn(self) -> None:
        """Per-step batch norm weights and biases (MAML++), initialised from the module's."""
        self._step_bn_index: dict[str, int] = {}
        if not self.spec.per_step_bn:
            return
        named = dict(self.module.named_parameters())
        rows = []
        for layer in self.spec.parametric_layers:
            if self.spec.is_per_step(layer):
                for name in (layer.weight_name, layer.bias_name):
                    self._step_bn_index[name] = len(rows)
                    p = named[name].detach()
                    rows.append(
                        nn.Parameter(
                            p.unsqueeze(0).repeat(self.inner_steps + 1, 1),
                            requires_grad=named[name].requires_grad,
                        )
                    )
        self.bn_steps = nn.ParameterList(rows)
        self._param_slots = None  # the per-step rows replace the module's batch norm params

    def _make_bn_running_stats(self, track: bool) -> None:
        if not isinstance(track, bool):
            raise TypeError(f"track_bn_stats: expected a bool, received {track!r}")
        self.bn_running_stats = None
        if not track:
            return
        layers = [layer for layer in self.spec.layers if layer.is_batch_norm]
        if not layers:
            raise ValueError(
                "track_bn_stats: the model has no BatchNorm layer to keep running statistics for"
            )
        steps = len(self.step_weights)
        self.bn_running_stats = BnRunningStats(layers, steps, self._params()[0])

    def _make_lrs(self, init: float) -> None:
        # A child module registered after the model, so parameters() lists the model's
        # parameters first and the learned rates last, as pymeta.MAML does.
        self.inner_lr = nn.Module()
        ref = self._params()[0]

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

    _param_slots = None  # where each core param lives: (module, attribute) or (None, bn_steps row)

    def _params(self) -> list[torch.Tensor]:
        """The core's params, in its order. Read from each layer's ``_parameters`` (a
        Parameter replaced on a layer is the one read), not by walking ``named_parameters``
        on every call: the layers themselves are guarded by ``_check_model``."""
        if self._param_slots is None:
            modules = dict(self.module.named_modules())
            step_bn = self._step_bn_index if hasattr(self, "bn_steps") else {}
            slots = []
            for name in self.spec.param_names:
                path, _, attr = name.rpartition(".")
                slots.append((None, step_bn[name]) if name in step_bn else (modules[path], attr))
            self._param_slots = slots
        return [
            self.bn_steps[attr] if module is None else module._parameters[attr]
            for module, attr in self._param_slots
        ]

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
            meta-gradient computed by the core (it cannot be differentiated again). In
            training mode with ``track_bn_stats``, also updates the running statistics.
        """
        params = self._params()
        sx, sy, qx, qy = self._checked_batch(batch, params)
        loss, _, _, _, bn_stats = self._loss_op(
            *self._core_args(sx, sy, qx, qy, params=params), False, False
        )
        if self.training and self.bn_running_stats is not None:
            self.bn_running_stats.update(bn_stats)
        return loss

    def compile_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None):
        """The whole meta-training step as one call: ``step = maml.compile_step(optimizer)``,
        then ``loss = step(batch)`` equals ``optimizer.zero_grad();
        maml.meta_loss(batch).backward(); optimizer.step()`` (with
        ``clip_grad_norm_(maml.parameters(), max_grad_norm)`` before the step when given), to
        float rounding, without the autograd round trip or torch.optim's Python loop.

        Args:
            optimizer: ``torch.optim.Adam``, ``AdamW`` or ``SGD`` (momentum, dampening,
                nesterov, weight decay) over this learner's parameters; its state and
                hyper-parameters stay in it (schedulers and ``state_dict`` work as usual).
            max_grad_norm: clip the meta-gradient to this total 2-norm first.

        Returns:
            A ``pymeta.model_aware.CompiledStep``: ``step(batch)`` returns the meta-loss (a
            detached scalar) and leaves the meta-gradient in ``.grad``.
        """
        from pymeta.model_aware.compiled_step import CompiledStep

        return CompiledStep(self, optimizer, max_grad_norm)

    def _checked_batch(self, batch: TaskBatch, params: list | None = None) -> tuple:
        """(support_x, support_y, query_x, query_y) of a batch, checked for the core (against
        ``params``, the core's params when the caller has read them)."""
        if not isinstance(batch, TaskBatch):
            raise TypeError(f"batch: expected a pymeta.TaskBatch, received {type(batch).__name__}")
        self._check_model()
        ref = (self._params() if params is None else params)[0]
        sx = self._inputs("batch.support_x", batch.support_x, ref)
        qx = self._inputs("batch.query_x", batch.query_x, ref)
        sy = self._targets("batch.support_y", batch.support_y)
        qy = self._targets("batch.query_y", batch.query_y)
        return sx, sy, qx, qy

    @property
    def _loss_op(self):
        return torch.ops.pymeta.net_maml_loss

    def _core_args(self, sx, sy, qx, qy, params=None, lrs=None) -> tuple:
        """The arguments of the core's loss op (``torch.ops.pymeta.net_maml_loss``) up to
        ``first_order``, for checked inputs; params and lrs default to this learner's own."""
        return (
            self._params() if params is None else params,
            self.inner_lrs() if lrs is None else lrs,
            sx, sy, qx, qy, self._layer_codes, self._layer_args, self.step_weights,
            _LR_MODE_CODES[self.lr_mode], self._loss_code(), self.first_order,
        )  # fmt: skip

    def adapt(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        steps: int | None = None,
        batched: bool | None = None,
        bn_stats: str = "batch",
    ) -> AdaptedModel:
        """Fast adaptation in the compiled core (no graph, meta-parameters untouched).

        Args:
            support_x: (K, ...) for one task or (T, K, ...) for a batch.
            support_y: (K, ...) or (T, K, ...) targets.
            steps: inner steps (default ``inner_steps``; at most ``inner_steps`` with
                ``lr_mode="per_layer_step"``, whose rates are per step).
            batched: whether the inputs carry a task dimension; inferred from the first
                layer's input when None (required when the model starts with a Flatten).
            bn_stats: what the adapted model's batch norm layers normalise the query with:
                "batch" (the query batch's own statistics, as in meta-training) or "running"
                (the per-step running statistics of step ``steps``; needs
                ``track_bn_stats=True``; predictions then do not depend on the other examples
                in the batch). Adaptation on the support set always uses batch statistics.

        Returns:
            An AdaptedModel: ``adapted(query_x)`` gives (Q, ...) or (T, Q, ...) predictions.
        """
        check_tensor("support_x", support_x)
        check_tensor("support_y", support_y)
        self._check_model()
        steps = self.inner_steps if steps is None else check_positive_int("steps", steps)
        task_forward = self._query_forward(bn_stats, steps)
        lrs = [lr.detach() for lr in self.inner_lrs()]
        if self.lr_mode == "per_layer_step":
            if steps > self.inner_steps:
                raise ValueError(
                    f"steps: per_layer_step rates exist for {self.inner_steps} steps, "
                    f"received {steps}"
                )
            lrs = [lrs[0][:steps]]
        if batched is None:
            batched = self._infer_batched(support_x)
        support_x, support_y = support_as_batch(support_x, support_y, batched)
        params = [p.detach() for p in self._params()]
        sx = self._inputs("support_x", support_x, params[0])
        sy = self._targets("support_y", support_y)
        adapted = torch.ops.pymeta.net_adapt(
            params, lrs, sx, sy, self._layer_codes, self._layer_args, steps,
            _LR_MODE_CODES[self.lr_mode], self._loss_code(),
        )  # fmt: skip
        named = dict(zip(self.spec.param_names, adapted))
        for name in self._step_bn_index:  # the query after `steps` steps uses row `steps`
            named[name] = named[name][:, steps]
        return AdaptedModel(task_forward, named, {}, batched, None)

    def _query_forward(self, bn_stats: str, steps: int) -> TaskForward:
        """The forward an adapted model runs: the module's own, or with running statistics."""
        if bn_stats not in ("batch", "running"):
            raise ValueError(f"bn_stats: expected 'batch' or 'running', received {bn_stats!r}")
        if bn_stats == "batch":
            return self._forward
        if self.bn_running_stats is None:
            raise ValueError("bn_stats='running' needs ModelAwareMAML(..., track_bn_stats=True)")
        rows = self.bn_running_stats.running_mean.shape[0]
        if steps >= rows:
            raise ValueError(
                f"steps: running statistics exist for 0..{rows - 1} inner steps (the "
                f"inner_steps of meta-training), received {steps}"
            )
        return TaskForward(self.bn_running_stats.inference_module(self.module, steps), "auto")

    def _infer_batched(self, support_x: torch.Tensor) -> bool:
        """From the first layer's example shape; after a leading Flatten, from the features
        of a Linear right after it."""
        layers = self.spec.layers
        first = next(layer.module for layer in layers if layer.module is not None)
        example_dims = {nn.Linear: 1, nn.BatchNorm1d: 1}.get(type(first), 3)
        if layers[0].kind == KINDS["flatten"]:
            if len(layers) > 1 and type(layers[1].module) is nn.Linear:
                features = layers[1].module.in_features
                return support_x.dim() >= 3 and math.prod(support_x.shape[2:]) == features
            raise ValueError(
                "batched: cannot be inferred for a model that starts with Flatten (not followed "
                "by a Linear layer); pass "
                "batched=True for (T, K, ...) inputs or False for (K, ...)"
            )
        return support_x.dim() == example_dims + 2

    # ------------------------------------------------------------------ checks
    def _loss_code(self) -> int:
        return LOSSES[self.loss.name]

    def _inputs(self, name: str, x: torch.Tensor, ref: torch.Tensor | None = None) -> torch.Tensor:
        """x, checked against the model: device and dtype of ``ref`` (default: its first core
        param; callers that hold the params pass it), (T, K, ...) shape, an output shape."""
        ref = self._params()[0] if ref is None else ref
        check_same_device(name, x, ref.device, "the model's parameters")
        if x.dtype != ref.dtype or x.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"{name}: expected dtype {ref.dtype} like the model's parameters (float32 or "
                f"float64), received {x.dtype}"
            )
        if x.dim() < 3 or x.shape[1] == 0:
            raise ValueError(
                f"{name}: expected (T, K, ...) inputs with K > 0, received shape {tuple(x.shape)}"
            )
        self._output_shape(name, x)
        return x

    def _output_shape(self, name: str, x: torch.Tensor) -> tuple:
        """The model's output shape for one example shaped like x[0, 0] (checked on the meta
        device, so no arithmetic is spent), or a ValueError naming the argument.

        A set of one example is probed as such: batch norm over one value per channel (e.g.
        BatchNorm1d after a Linear) has no batch statistics, and PyTorch refuses it, so the core
        must not compute something for it."""
        example = tuple(x.shape[2:])
        rows = 1 if x.shape[1] == 1 else 2
        if (rows, example) not in self._output_shapes:
            params = {n: p.to("meta") for n, p in self.module.named_parameters()}
            probe = torch.empty((rows, *example), dtype=x.dtype, device="meta")
            try:
                out = call_module(self.module, params, (probe,))
            except (RuntimeError, ValueError) as err:
                raise ValueError(
                    f"{name}: the model cannot take examples of shape {example} "
                    f"(input shape {tuple(x.shape)}): {err}"
                ) from None
            self._output_shapes[(rows, example)] = tuple(out.shape[1:])
        self._last_output_shape = self._output_shapes[(rows, example)]
        return self._last_output_shape

    def _out_features(self) -> tuple:
        """The output shape of one example, for the inputs checked last."""
        return self._last_output_shape

    def _targets(self, name: str, y: torch.Tensor) -> torch.Tensor:
        out_shape = self._out_features()
        classes = out_shape[0] if len(out_shape) == 1 else None
        self.loss.check_targets(name, y, batched=True, classes=classes)
        if self.loss.name == "mse" and (y.dim() < 3 or tuple(y.shape[2:]) != out_shape):
            raise ValueError(
                f"{name}: mse expects targets (T, K, {', '.join(map(str, out_shape))}) like the "
                f"model's output, received shape {tuple(y.shape)}"
            )
        if self.loss.name == "cross_entropy" and classes is None:
            raise ValueError(
                f"{name}: cross-entropy needs (N, classes) model outputs, the model gives "
                f"(N, {', '.join(map(str, out_shape))})"
            )
        return y
