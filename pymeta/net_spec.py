"""Reads an nn.Sequential of convolutions, batch norm, pooling, Linear layers and activations into
the layer description that the model-aware core's layered path (``seq_maml_loss``) runs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pymeta.encoding import BATCHNORM_INTS, SEQ_KINDS, SEQ_NUM_INTS, seq_layer
from pymeta.mlp_spec import ACTIVATION_CODES
from pymeta.module_checks import flatten_sequential

SUPPORTED = (
    "Linear, Conv2d (groups=1, dilation=1, zero padding), BatchNorm1d/2d (batch statistics: "
    "track_running_stats=False), ReLU, LeakyReLU, Tanh, Sigmoid, MaxPool2d, AvgPool2d, Flatten, "
    "Identity"
)
KIND = SEQ_KINDS  # layer kind name -> the core's code (csrc/seq_net.h, via pymeta.encoding)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass
class NetLayerSpec:
    module: nn.Module
    position: int  # index in the flattened module list (model[i])
    name: str
    kind: int
    flag: int = 0
    ints: tuple = (0,) * SEQ_NUM_INTS
    arg: float = 0.0
    weight_name: str | None = None
    bias_name: str | None = None

    @property
    def parametric(self) -> bool:
        return self.weight_name is not None

    @property
    def is_batch_norm(self) -> bool:
        return self.kind == KIND["batchnorm"]


def _read_layer(name: str, child: nn.Module, position: int) -> NetLayerSpec | None:
    where = f"model.{name} ({type(child).__name__})"
    spec = NetLayerSpec(child, position, name, 0)
    params = dict(weight_name=f"{name}.weight", bias_name=None)
    if getattr(child, "bias", None) is not None:
        params["bias_name"] = f"{name}.bias"
    if type(child) is nn.Identity:
        return None
    if type(child) is nn.Linear:
        spec.kind, spec.flag = KIND["linear"], int(child.bias is not None)
        spec.weight_name, spec.bias_name = params["weight_name"], params["bias_name"]
    elif type(child) is nn.Conv2d:
        if child.groups != 1 or _pair(child.dilation) != (1, 1):
            raise ValueError(
                f"{where}: only groups=1 and dilation=1 are supported by ModelAwareMAML"
            )
        if isinstance(child.padding, str) or child.padding_mode != "zeros":
            raise ValueError(
                f"{where}: only numeric zero padding is supported by ModelAwareMAML, received "
                f"padding={child.padding!r}, padding_mode={child.padding_mode!r}"
            )
        spec.kind, spec.flag = KIND["conv2d"], int(child.bias is not None)
        spec.ints = (*_pair(child.stride), *_pair(child.padding), 0, 0)
        spec.weight_name, spec.bias_name = params["weight_name"], params["bias_name"]
    elif type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if child.track_running_stats:
            raise ValueError(
                f"{where}: ModelAwareMAML normalises with batch statistics (the MAML convention), "
                "so it needs track_running_stats=False (the module's running statistics would "
                "never be used or updated; ModelAwareMAML(..., track_bn_stats=True) keeps "
                "per-step ones)"
            )
        spec.kind, spec.flag, spec.arg = KIND["batchnorm"], int(child.affine), float(child.eps)
        ints = [0] * SEQ_NUM_INTS
        ints[BATCHNORM_INTS["channels"]] = child.num_features
        spec.ints = tuple(ints)
        if child.affine:
            spec.weight_name, spec.bias_name = params["weight_name"], params["bias_name"]
    elif type(child) in ACTIVATION_CODES:
        spec.kind, spec.flag = KIND["activation"], ACTIVATION_CODES[type(child)]
        if type(child) is nn.LeakyReLU:
            spec.arg = float(child.negative_slope)
    elif type(child) in (nn.MaxPool2d, nn.AvgPool2d):
        if child.ceil_mode:
            raise ValueError(f"{where}: ceil_mode=True is not supported by ModelAwareMAML")
        stride = child.stride if child.stride is not None else child.kernel_size
        if type(child) is nn.MaxPool2d:
            if _pair(child.dilation) != (1, 1) or child.return_indices:
                raise ValueError(
                    f"{where}: only dilation=1 without return_indices is supported by "
                    "ModelAwareMAML"
                )
            spec.kind = KIND["maxpool"]
        else:
            if child.divisor_override is not None:
                raise ValueError(f"{where}: divisor_override is not supported by ModelAwareMAML")
            spec.kind, spec.flag = KIND["avgpool"], int(child.count_include_pad)
        spec.ints = (*_pair(child.kernel_size), *_pair(stride), *_pair(child.padding))
    elif type(child) is nn.Flatten:
        if child.start_dim != 1 or child.end_dim != -1:
            raise ValueError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported")
        spec.kind = KIND["flatten"]
    else:
        raise ValueError(
            f"{where}: layer type not supported by ModelAwareMAML (supported: {SUPPORTED}); "
            "use pymeta.MAML, which takes any nn.Module"
        )
    return spec


@dataclass
class NetSpec:
    """The network as the layered core sees it: every layer in order.

    Attributes:
        layers: one NetLayerSpec per non-Identity leaf module.
        num_modules: length of the flattened module list (model[i] indexes it).
        per_step_bn: whether affine batch norm layers take per-step weights (MAML++).
    """

    layers: list
    num_modules: int
    per_step_bn: bool = False

    @classmethod
    def from_module(cls, model: nn.Module, per_step_bn: bool = False) -> "NetSpec":
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"model: ModelAwareMAML expects an nn.Sequential of {SUPPORTED}, received "
                f"{type(model).__name__}; use pymeta.MAML for any other nn.Module"
            )
        leaves = flatten_sequential(model)
        layers = [
            spec
            for position, (name, child) in enumerate(leaves)
            if (spec := _read_layer(name, child, position)) is not None
        ]
        if not any(layer.parametric for layer in layers):
            raise ValueError("model: ModelAwareMAML needs at least one layer with parameters")
        if per_step_bn and not any(layer.is_batch_norm and layer.parametric for layer in layers):
            raise ValueError(
                "per_step_bn: the model has no affine BatchNorm layer to give per-step weights"
            )
        return cls(layers, len(leaves), per_step_bn)

    @property
    def parametric_layers(self) -> list[NetLayerSpec]:
        return [layer for layer in self.layers if layer.parametric]

    def is_per_step(self, layer: NetLayerSpec) -> bool:
        return self.per_step_bn and layer.is_batch_norm and layer.parametric

    @property
    def param_names(self) -> list[str]:
        """Names of the params in the core's order: weight, [bias] of each parametric layer."""
        names = []
        for layer in self.parametric_layers:
            names.append(layer.weight_name)
            if layer.bias_name:
                names.append(layer.bias_name)
        return names

    def resolve_adapted(self, adapt_layers) -> list[bool]:
        """Which parametric layers adapt: None (all but per-step batch norm), "head" (the last
        Linear, as in ANIL), or model[i] indices."""
        layers = self.parametric_layers
        if adapt_layers is None:
            return [not self.is_per_step(layer) for layer in layers]
        if adapt_layers == "head":
            linear = [i for i, layer in enumerate(layers) if layer.kind == KIND["linear"]]
            head = linear[-1] if linear else len(layers) - 1
            return [i == head for i in range(len(layers))]
        if isinstance(adapt_layers, str) or not hasattr(adapt_layers, "__iter__"):
            raise TypeError(
                "adapt_layers: expected None, 'head' or a list of model indices, received "
                f"{adapt_layers!r}"
            )
        by_position = {layer.position: i for i, layer in enumerate(layers)}
        adapted = [False] * len(layers)
        for index in adapt_layers:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"adapt_layers: expected int indices, received {index!r}")
            pos = index + self.num_modules if index < 0 else index
            if pos not in by_position:
                raise ValueError(
                    f"adapt_layers: model[{index}] has no parameters to adapt; layers with "
                    f"parameters are at indices {sorted(by_position)}"
                )
            if self.is_per_step(layers[by_position[pos]]):
                raise ValueError(
                    f"adapt_layers: model[{index}] is a batch norm layer with per-step weights, "
                    "which are meta-learned, not adapted"
                )
            adapted[by_position[pos]] = True
        if not any(adapted):
            raise ValueError("adapt_layers: expected at least one layer to adapt, received none")
        return adapted

    def core_layers(self, adapted: list[bool]) -> tuple[list[int], list[float]]:
        """The op's ``layers`` ints and ``layer_args`` floats for the given adaptation."""
        flags = iter(adapted)
        ints, args = [], []
        for layer in self.layers:
            is_adapted = next(flags) if layer.parametric else False
            extra = list(layer.ints)
            if self.is_per_step(layer):
                extra[BATCHNORM_INTS["per_step"]] = 1
            ints += seq_layer(layer.kind, layer.flag, is_adapted, extra)
            args.append(layer.arg)
        return ints, args
