"""Reads an nn.Sequential MLP into the layer description the model-aware core runs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pymeta.encoding import ACTIVATIONS
from pymeta.module_checks import flatten_sequential

# Module type -> the core's activation code (csrc/mlp_maml_math.h, via pymeta.encoding).
ACTIVATION_CODES = {
    nn.ReLU: ACTIVATIONS.get("relu"),
    nn.LeakyReLU: ACTIVATIONS.get("leaky_relu"),
    nn.Tanh: ACTIVATIONS.get("tanh"),
    nn.Sigmoid: ACTIVATIONS.get("sigmoid"),
}
SUPPORTED = "Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Flatten, Identity"


@dataclass
class MlpLayerSpec:
    linear: nn.Linear
    position: int  # index of the Linear in the flattened module list
    weight_name: str
    bias_name: str | None
    activation: int | None = ACTIVATIONS.get("none")
    slope: float = 0.0

    @property
    def module(self) -> nn.Linear:
        return self.linear


@dataclass
class MlpSpec:
    """The MLP as a list of Linear layers, each followed by at most one activation.

    Attributes:
        layers: the Linear layers in order, with their activation codes.
        flatten_input: whether examples are flattened before the first Linear (a leading
            nn.Flatten).
        num_modules: length of the flattened module list (model[i] indexes it).
    """

    layers: list
    flatten_input: bool
    num_modules: int

    @classmethod
    def from_module(cls, model: nn.Module) -> "MlpSpec":
        if not isinstance(model, nn.Sequential):
            raise TypeError(
                f"model: ModelAwareMAML expects an nn.Sequential of {SUPPORTED}, received "
                f"{type(model).__name__}; use pymeta.MAML for any other nn.Module"
            )
        layers: list[MlpLayerSpec] = []
        flatten_input = False
        leaves = flatten_sequential(model)
        for position, (name, child) in enumerate(leaves):
            kind = type(child)
            where = f"model.{name} ({kind.__name__})"
            if kind is nn.Identity:
                continue
            if kind is nn.Flatten:
                if not layers:
                    flatten_input = True
                elif child.start_dim != 1 or child.end_dim != -1:
                    raise ValueError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported")
                continue
            if kind is nn.Linear:
                layers.append(
                    MlpLayerSpec(
                        child,
                        position,
                        f"{name}.weight",
                        f"{name}.bias" if child.bias is not None else None,
                    )
                )
                continue
            if kind in ACTIVATION_CODES:
                if not layers:
                    raise ValueError(
                        f"{where}: an activation before the first Linear is not supported by "
                        "ModelAwareMAML; use pymeta.MAML"
                    )
                if layers[-1].activation != ACTIVATIONS.get("none"):
                    raise ValueError(
                        f"{where}: two activations in a row are not supported by "
                        "ModelAwareMAML; use pymeta.MAML"
                    )
                layers[-1].activation = ACTIVATION_CODES[kind]
                if kind is nn.LeakyReLU:
                    layers[-1].slope = float(child.negative_slope)
                continue
            raise ValueError(
                f"{where}: layer type not supported by ModelAwareMAML (supported: {SUPPORTED}); "
                "use pymeta.MAML, which takes any nn.Module"
            )
        if not layers:
            raise ValueError("model: ModelAwareMAML needs at least one nn.Linear, received none")
        return cls(layers, flatten_input, len(leaves))

    @property
    def param_names(self) -> list[str]:
        """Names of the params in the core's order: W_1, [b_1], W_2, [b_2], ..."""
        names = []
        for layer in self.layers:
            names.append(layer.weight_name)
            if layer.bias_name:
                names.append(layer.bias_name)
        return names

    def resolve_adapted(self, adapt_layers) -> list[bool]:
        """Which Linear layers adapt: None (all), "head" (the last), or model[i] indices."""
        n = len(self.layers)
        if adapt_layers is None:
            return [True] * n
        if adapt_layers == "head":
            return [i == n - 1 for i in range(n)]
        if isinstance(adapt_layers, str) or not hasattr(adapt_layers, "__iter__"):
            raise TypeError(
                "adapt_layers: expected None, 'head' or a list of model indices, received "
                f"{adapt_layers!r}"
            )
        by_position = {layer.position: i for i, layer in enumerate(self.layers)}
        total = self.num_modules
        adapted = [False] * n
        for index in adapt_layers:
            if isinstance(index, bool) or not isinstance(index, int):
                raise TypeError(f"adapt_layers: expected int indices, received {index!r}")
            pos = index + total if index < 0 else index
            if pos not in by_position:
                raise ValueError(
                    f"adapt_layers: model[{index}] is not an nn.Linear; Linear layers are at "
                    f"indices {sorted(by_position)}"
                )
            adapted[by_position[pos]] = True
        if not any(adapted):
            raise ValueError("adapt_layers: expected at least one layer to adapt, received none")
        return adapted
