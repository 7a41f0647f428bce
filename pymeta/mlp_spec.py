"""Reads an nn.Sequential MLP into the layer description the model-aware core runs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ACTIVATION_CODES = {nn.ReLU: 1, nn.LeakyReLU: 2, nn.Tanh: 3, nn.Sigmoid: 4}
SUPPORTED = "Linear, ReLU, LeakyReLU, Tanh, Sigmoid, Flatten, Identity"


@dataclass
class MlpLayerSpec:
    linear: nn.Linear
    position: int  # index of the Linear in the flattened module list
    weight_name: str
    bias_name: str | None
    activation: int = 0
    slope: float = 0.0

    @property
    def module(self) -> nn.Linear:
        return self.linear


# Every layer type that a model-aware reader knows (net_spec's list; the MLP reader takes a
# subset). Other types get the readers' own "not supported" errors.
CORE_LAYER_TYPES = (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
    nn.Sigmoid, nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Identity,
)  # fmt: skip
_GLOBAL_HOOKS = {
    "_global_forward_hooks": "forward hook (register_module_forward_hook)",
    "_global_forward_pre_hooks": "forward pre-hook (register_module_forward_pre_hook)",
    "_global_backward_hooks": "backward hook (register_module_full_backward_hook)",
    "_global_backward_pre_hooks": "backward pre-hook (register_module_backward_pre_hook)",
}
_MODULE_HOOKS = {
    "_forward_hooks": "forward hook",
    "_forward_pre_hooks": "forward pre-hook",
    "_backward_hooks": "backward hook",
    "_backward_pre_hooks": "backward pre-hook",
}
_USE_MAML = "use pymeta.MAML, which runs the module itself"


def flatten_sequential(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the leaves of nested nn.Sequentials, in order; a module
    object used twice is listed at both places.

    The one check, for both model-aware readers, that the core computes the network that
    ``model(x)`` computes. Raises ValueError naming the module for: forward or backward hooks
    (on any module, or global ones), a subclass of a supported layer type, a container or layer
    with its own forward, a layer with parameters or batch norm used twice, and one Parameter
    held by two layers (tied weights).
    """
    module_module = nn.modules.module
    for attr, what in _GLOBAL_HOOKS.items():
        if getattr(module_module, attr, None):
            raise ValueError(
                f"model: a global {what} is registered, which ModelAwareMAML's core would not "
                f"run; remove it or {_USE_MAML}"
            )
    leaves: list[tuple[str, nn.Module]] = []
    _collect_leaves(model, "", leaves)
    _check_sharing(leaves)
    return leaves


def _where(name: str, module) -> str:
    return f"model{'.' if name else ''}{name} ({type(module).__name__})"


def _check_runs_as_is(name: str, module: nn.Module) -> None:
    """No hooks and no forward other than the class's own."""
    state = vars(module)
    for attr, what in _MODULE_HOOKS.items():
        if state.get(attr):
            raise ValueError(
                f"{_where(name, module)}: has a {what}, which ModelAwareMAML's core would not "
                f"run; remove it or {_USE_MAML}"
            )
    if "forward" in state:
        raise ValueError(
            f"{_where(name, module)}: overrides forward on the instance, which ModelAwareMAML's "
            f"core would not run; {_USE_MAML}"
        )


def _collect_leaves(container: nn.Sequential, prefix: str, out: list) -> None:
    """Appends the leaves under ``container`` (named ``prefix``) to ``out``, checking each
    container and leaf on the way."""
    cls = type(container)
    if cls.forward is not nn.Sequential.forward or cls.__call__ is not nn.Module.__call__:
        raise ValueError(
            f"{_where(prefix.rstrip('.'), container)}: overrides forward, which ModelAwareMAML's "
            f"core would not run; {_USE_MAML}"
        )
    _check_runs_as_is(prefix.rstrip("."), container)
    # _modules, not named_children(): that one lists a module used twice only once.
    for name, child in container._modules.items():
        qual = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            _collect_leaves(child, qual + ".", out)
            continue
        if child is not None:
            _check_runs_as_is(qual, child)
            base = type(child) in CORE_LAYER_TYPES or next(
                (t for t in CORE_LAYER_TYPES if isinstance(child, t)), None
            )
            if base not in (None, True):
                raise ValueError(
                    f"{_where(qual, child)}: a subclass of nn.{base.__name__}; ModelAwareMAML "
                    f"runs only the exact layer types (not the subclass's code); {_USE_MAML}"
                )
        out.append((qual, child))


def _check_sharing(leaves: list) -> None:
    """Parameterless layers may be used twice (the core runs them twice, exactly); a layer
    with parameters or batch-norm statistics may not, and neither may a tied Parameter: the core
    gives every use of a layer its own parameters and statistics."""
    seen_module: dict[int, str] = {}
    seen_param: dict[int, str] = {}
    for name, child in leaves:
        if child is None:
            continue
        # Leaves are exact layer types without submodules: their _parameters are all they hold.
        params = [(a, p) for a, p in child._parameters.items() if p is not None]
        if id(child) in seen_module:
            if params or isinstance(child, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"model.{seen_module[id(child)]} and model.{name} are the same "
                    f"nn.{type(child).__name__} (one module used twice); ModelAwareMAML's core "
                    f"gives every use its own parameters and statistics, so shared layers are "
                    f"not supported; {_USE_MAML}"
                )
            continue
        seen_module[id(child)] = name
        for attr, p in params:
            qual = f"{name}.{attr}"
            if id(p) in seen_param:
                raise ValueError(
                    f"model.{seen_param[id(p)]} and model.{qual} are the same Parameter (tied "
                    f"weights); ModelAwareMAML's core gives every layer its own parameters; "
                    f"{_USE_MAML}"
                )
            seen_param[id(p)] = qual


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
                if layers[-1].activation:
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
