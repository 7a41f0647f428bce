"""Reads a module into the graph of layers that the model-aware core (``net_maml_loss``) runs,
by ``torch.fx`` symbolic tracing: the one reader, for MLPs and any other network.

Any module whose traced graph uses only supported operations is accepted: ``nn.Sequential``
models, and blocks with their own ``forward`` such as a residual block written the torchvision
way (``out = self.body(x); out = out + self.shortcut(x)``). The graph becomes a list of layers in
topological order; each reads one or two earlier values (value 0 is the input, layer l writes
value l + 1). Anything else raises a ValueError that names the node and its place in the module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from pymeta.model_aware.encoding import (
    ACTIVATIONS,
    BATCHNORM_INTS,
    CONV_INTS,
    KINDS,
    NUM_INTS,
    POOL_INTS,
    layer_ints,
    layer_row,
)  # fmt: skip
from pymeta.model_aware.module_checks import CORE_LAYER_TYPES, check_no_hooks, check_sharing

SUPPORTED = (
    "Linear, Conv2d (groups=1, dilation=1, zero padding), BatchNorm1d/2d (batch statistics: "
    "track_running_stats=False), ReLU, LeakyReLU, Tanh, Sigmoid (modules or functions), "
    "MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), Flatten, flatten(x, 1), "
    "x.view/reshape(x.size(0), -1), Identity, the sum of two tensors (residual add) and "
    "torch.cat along the channels (dim=1)"
)
# Activation module type -> the core's activation code (csrc/net/codes.h, via encoding).
ACTIVATION_CODES = {
    nn.ReLU: ACTIVATIONS.get("relu"),
    nn.LeakyReLU: ACTIVATIONS.get("leaky_relu"),
    nn.Tanh: ACTIVATIONS.get("tanh"),
    nn.Sigmoid: ACTIVATIONS.get("sigmoid"),
}
_USE_MAML = "use pymeta.MAML, which takes any nn.Module"

# Functions and tensor methods that are activations, with the nn module they equal.
_ACTIVATION_FUNCTIONS = {
    F.relu: nn.ReLU, torch.relu: nn.ReLU, F.leaky_relu: nn.LeakyReLU, torch.tanh: nn.Tanh,
    F.tanh: nn.Tanh, torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid,
}  # fmt: skip
_ACTIVATION_METHODS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
_ADD = (operator.add, operator.iadd, torch.add)
_CAT = (torch.cat, torch.concat)


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


@dataclass
class NetLayerSpec:
    """One layer of the core's graph.

    Attributes:
        module: the nn.Module it runs (None for add, concat and functional forms).
        position: its index in the flattened module list (model[i]) for nn.Sequential models,
            else None.
        name: the module's qualified name, or the fx node's name for functional forms.
        kind, flag, ints, arg: the core's encoding of the layer (csrc/net/net.h).
        inputs: the values it reads (0: the network input, l + 1: layer l's output).
    """

    module: nn.Module | None
    position: int | None
    name: str
    kind: int
    flag: int = 0
    ints: tuple = (0,) * NUM_INTS
    arg: float = 0.0
    weight_name: str | None = None
    bias_name: str | None = None
    inputs: tuple = (0,)

    @property
    def parametric(self) -> bool:
        return self.weight_name is not None

    @property
    def is_batch_norm(self) -> bool:
        return self.kind == KINDS["batchnorm"]


def _read_layer(name: str, child: nn.Module, where: str) -> NetLayerSpec | None:
    """The layer of one supported module (None for Identity), or a ValueError."""
    spec = NetLayerSpec(child, None, name, 0)
    params = dict(weight_name=f"{name}.weight", bias_name=None)
    if getattr(child, "bias", None) is not None:
        params["bias_name"] = f"{name}.bias"
    if type(child) is nn.Identity:
        return None
    if type(child) is nn.Linear:
        spec.kind, spec.flag = KINDS["linear"], int(child.bias is not None)
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
        spec.kind, spec.flag = KINDS["conv2d"], int(child.bias is not None)
        spec.ints = layer_ints(CONV_INTS, stride=_pair(child.stride), padding=_pair(child.padding))
        spec.weight_name, spec.bias_name = params["weight_name"], params["bias_name"]
    elif type(child) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if child.track_running_stats:
            raise ValueError(
                f"{where}: ModelAwareMAML normalises with batch statistics (the MAML convention), "
                "so it needs track_running_stats=False (the module's running statistics would "
                "never be used or updated; ModelAwareMAML(..., track_bn_stats=True) keeps "
                "per-step ones)"
            )
        spec.kind, spec.flag, spec.arg = KINDS["batchnorm"], int(child.affine), float(child.eps)
        spec.ints = layer_ints(BATCHNORM_INTS, channels=child.num_features)
        if child.affine:
            spec.weight_name, spec.bias_name = params["weight_name"], params["bias_name"]
    elif type(child) in ACTIVATION_CODES:
        spec.kind, spec.flag = KINDS["activation"], ACTIVATION_CODES[type(child)]
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
            spec.kind = KINDS["maxpool"]
        else:
            if child.divisor_override is not None:
                raise ValueError(f"{where}: divisor_override is not supported by ModelAwareMAML")
            spec.kind, spec.flag = KINDS["avgpool"], int(child.count_include_pad)
        spec.ints = layer_ints(
            POOL_INTS,
            kernel=_pair(child.kernel_size),
            stride=_pair(stride),
            padding=_pair(child.padding),
        )
    elif type(child) is nn.AdaptiveAvgPool2d:
        if _pair(child.output_size) != (1, 1):
            raise ValueError(
                f"{where}: only output_size=1 (global average pooling) is supported by "
                f"ModelAwareMAML, received {child.output_size!r}"
            )
        spec.kind = KINDS["global_avgpool"]
    elif type(child) is nn.Flatten:
        if child.start_dim != 1 or child.end_dim != -1:
            raise ValueError(f"{where}: only Flatten(start_dim=1, end_dim=-1) is supported")
        spec.kind = KINDS["flatten"]
    else:
        raise ValueError(
            f"{where}: layer type not supported by ModelAwareMAML (supported: {SUPPORTED}); "
            f"{_USE_MAML}"
        )
    return spec


class _Tracer(fx.Tracer):
    """Stops at the layer types the core knows, and at their subclasses (refused by name, as
    the core would run the base type's rule, not the subclass's code)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, CORE_LAYER_TYPES) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's fx graph (dead code removed), or a ValueError saying why it cannot be read."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - fx raises many types for untraceable code
        raise ValueError(
            f"model: torch.fx could not trace {type(model).__name__}.forward ({type(err).__name__}:"
            f" {err}); ModelAwareMAML reads the network from its traced graph; {_USE_MAML}"
        ) from None
    graph = fx.GraphModule(model, graph).graph  # dead-code elimination needs the owning module
    graph.eliminate_dead_code()
    return graph


def graph_signature(graph: fx.Graph) -> list[tuple]:
    """What the core's description depends on, node by node: a changed forward changes it."""
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _is_batch_size(node) -> bool:
    """Whether an fx argument reads a tensor's first dimension: x.size(0) or x.shape[0]."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size":
        return node.args[1:] == (0,) or node.kwargs == {"dim": 0}
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return (
            isinstance(src, fx.Node)
            and src.op == "call_function"
            and src.target is getattr
            and src.args[1] == "shape"
        )
    return False


def _is_flatten(node: fx.Node) -> bool:
    """flatten(x, 1), x.flatten(1), or x.view/reshape(x.size(0), -1) (also as one tuple)."""
    args, kwargs = node.args, node.kwargs
    if (node.op, node.target) in (("call_function", torch.flatten), ("call_method", "flatten")):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return start == 1 and end == -1 and len(kwargs) <= 2
    if node.op == "call_method" and node.target in ("view", "reshape") and not kwargs:
        shape = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return len(shape) == 2 and _is_batch_size(shape[0]) and shape[1] == -1
    return False


class _GraphReader:
    """Walks an fx graph into NetLayerSpecs, mapping fx nodes to the core's values."""

    def __init__(self, model: nn.Module, positions: dict[str, int]):
        self.model = model
        self.positions = positions  # module name -> model[i], for nn.Sequential models
        self.layers: list[NetLayerSpec] = []
        self.values: dict[fx.Node, int] = {}
        self.called: dict[str, str] = {}  # parametric module name -> node that calls it

    def where(self, node: fx.Node) -> str:
        """model.<name> (Type) for a module call; for any other node its name, what it calls
        and the forward it is in."""
        if node.op == "call_module":
            return f"model.{node.target} ({type(self.model.get_submodule(node.target)).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        owner, cls = next(reversed(stack.values()), ("", type(self.model)))
        place = f"model{'.' if owner else ''}{owner} ({cls.__name__})"
        what = getattr(node.target, "__name__", node.target)
        return f"node {node.name!r} ({node.op} {what}) in the forward of {place}"

    def unsupported(self, node: fx.Node, why: str = "") -> ValueError:
        detail = f" ({why})" if why else ""
        return ValueError(
            f"{self.where(node)}: not supported by ModelAwareMAML{detail}; supported: "
            f"{SUPPORTED}; {_USE_MAML}"
        )

    def value(self, node: fx.Node, arg) -> int:
        if not isinstance(arg, fx.Node) or arg not in self.values:
            raise self.unsupported(node, f"its input {arg!r} is not a tensor the core computes")
        return self.values[arg]

    def add(self, node: fx.Node, spec: NetLayerSpec, inputs: list) -> None:
        spec.inputs = tuple(self.value(node, a) for a in inputs)
        self.layers.append(spec)
        self.values[node] = len(self.layers)

    def functional(self, node: fx.Node, kind: str, flag: int = 0, arg: float = 0.0):
        return NetLayerSpec(None, None, node.name, KINDS[kind], flag=flag, arg=arg)

    def read(self, graph: fx.Graph) -> None:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ValueError(
                f"model: {type(self.model).__name__}.forward takes {len(placeholders)} inputs; "
                f"ModelAwareMAML runs networks of one input tensor; {_USE_MAML}"
            )
        for node in graph.nodes:
            if node.op == "placeholder":
                self.values[node] = 0
            elif node.op == "output":
                out = node.args[0]
                if self.value(node, out) != len(self.layers) or not self.layers:
                    raise self.unsupported(node, "the output must be one tensor, the last layer's")
            elif node.op == "call_module":
                self.read_module(node)
            elif _is_batch_size(node) or (
                node.op == "call_function" and node.target is getattr and node.args[1] == "shape"
            ):
                continue  # shape reads feed a flatten (checked there) and compute nothing
            elif node.op in ("call_function", "call_method"):
                self.read_function(node)
            else:  # get_attr: a parameter or buffer used outside its module
                raise self.unsupported(node, "it reads a parameter or buffer directly")

    def read_module(self, node: fx.Node) -> None:
        module = self.model.get_submodule(node.target)
        where = self.where(node)
        base = next((t for t in CORE_LAYER_TYPES if isinstance(module, t)), None)
        if base is not None and type(module) is not base:
            raise ValueError(
                f"{where}: a subclass of nn.{base.__name__}; ModelAwareMAML runs only the exact "
                f"layer types (not the subclass's code); {_USE_MAML}"
            )
        if len(node.args) != 1 or node.kwargs:
            raise self.unsupported(node, "called with more than one argument")
        spec = _read_layer(node.target, module, where)
        if spec is None:  # Identity
            self.values[node] = self.value(node, node.args[0])
            return
        if spec.parametric or spec.is_batch_norm:
            if node.target in self.called:
                names = [
                    f"model.{n}"
                    for n, m in self.model.named_modules(remove_duplicate=False)
                    if m is module
                ]
                what = (
                    " and ".join(names[:2]) + f" are the same nn.{type(module).__name__}"
                    if len(names) > 1
                    else f"{where} is called twice, the same nn.{type(module).__name__}"
                )
                raise ValueError(
                    f"{what} (one module used twice); "
                    "ModelAwareMAML's core gives every use its own parameters and statistics, "
                    f"so shared layers are not supported; {_USE_MAML}"
                )
            self.called[node.target] = node.name
        spec.position = self.positions.get(node.target)
        self.add(node, spec, [node.args[0]])

    def read_function(self, node: fx.Node) -> None:
        target, args, kwargs = node.target, node.args, node.kwargs
        if node.op == "call_function" and target in _ADD:
            if len(args) != 2 or kwargs or not all(isinstance(a, fx.Node) for a in args):
                raise self.unsupported(node, "only the sum of two tensors is supported")
            self.add(node, self.functional(node, "add"), list(args))
        elif node.op == "call_function" and target in _CAT:
            tensors = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if dim != 1 or len(tensors) < 2 or set(kwargs) - {"dim"}:
                raise self.unsupported(node, f"only concatenation along dim=1, received {dim}")
            # cat(a, b, c) = cat(cat(a, b), c): the core's concat takes two inputs.
            value = self.value(node, tensors[0])
            for other in tensors[1:]:
                spec = self.functional(node, "concat")
                spec.inputs = (value, self.value(node, other))
                self.layers.append(spec)
                value = len(self.layers)
            self.values[node] = value
        elif _is_flatten(node):
            self.add(node, self.functional(node, "flatten"), [args[0]])
        elif node.op == "call_method" and target == "contiguous" and len(args) == 1:
            self.values[node] = self.value(node, args[0])
        elif (node.op == "call_function" and target in _ACTIVATION_FUNCTIONS) or (
            node.op == "call_method" and target in _ACTIVATION_METHODS
        ):
            self.read_activation(node)
        elif node.op == "call_function" and target is F.adaptive_avg_pool2d:
            size = args[1] if len(args) > 1 else kwargs.get("output_size")
            if _pair(size) != (1, 1):
                raise self.unsupported(node, f"output_size must be 1, received {size!r}")
            self.add(node, self.functional(node, "global_avgpool"), [args[0]])
        else:
            raise self.unsupported(node)

    def read_activation(self, node: fx.Node) -> None:
        table = _ACTIVATION_FUNCTIONS if node.op == "call_function" else _ACTIVATION_METHODS
        module_type = table[node.target]
        args, kwargs = node.args, dict(node.kwargs)
        kwargs.pop("inplace", None)  # the core never writes its inputs: the result is the same
        slope = 0.0
        if module_type is nn.LeakyReLU:
            slope = args[1] if len(args) > 1 else kwargs.pop("negative_slope", 0.01)
            args = args[:1] + args[2:]
        if len(args) != 1 or kwargs or not isinstance(slope, (int, float)):
            raise self.unsupported(node, "unexpected arguments")
        spec = self.functional(node, "activation", ACTIVATION_CODES[module_type], float(slope))
        self.add(node, spec, [args[0]])


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def sequential_positions(model: nn.Module) -> dict[str, int]:
    """model[i] index of every leaf module name, for (nested) nn.Sequential models without
    their own forward; {} for any other model."""
    if type(model).forward is not nn.Sequential.forward:
        return {}
    positions: dict[str, int] = {}

    def walk(container, prefix):
        for name, child in container._modules.items():
            if isinstance(child, nn.Sequential) and type(child).forward is nn.Sequential.forward:
                walk(child, f"{prefix}{name}.")
            else:
                positions.setdefault(f"{prefix}{name}", len(positions))

    walk(model, "")
    return positions


@dataclass
class NetSpec:
    """The network as the layered core sees it: a graph of layers in topological order.

    Attributes:
        layers: one NetLayerSpec per computing node (Identity and shape reads take none).
        positions: model[i] index of each leaf module name, for nn.Sequential models
            (sequential_positions); empty for others.
        per_step_bn: whether affine batch norm layers take per-step weights (MAML++).
        signature: the traced graph's signature (graph_signature), to notice a changed forward.
        modules: the modules the graph calls, by qualified name.
        plain: every module is a layer type the core knows or a plain nn.Sequential, so no
            forward of the user's can trace differently later.
    """

    layers: list
    positions: dict
    per_step_bn: bool = False
    signature: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    plain: bool = False

    @classmethod
    def from_module(cls, model: nn.Module, per_step_bn: bool = False) -> "NetSpec":
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, received {type(model).__name__}")
        check_no_hooks(model)
        graph = trace(model)
        positions = sequential_positions(model)
        reader = _GraphReader(model, positions)
        reader.read(graph)
        layers = reader.layers
        modules = {layer.name: layer.module for layer in layers if layer.module is not None}
        check_sharing(list(modules.items()))
        if not any(layer.parametric for layer in layers):
            raise ValueError("model: ModelAwareMAML needs at least one layer with parameters")
        if per_step_bn and not any(layer.is_batch_norm and layer.parametric for layer in layers):
            raise ValueError(
                "per_step_bn: the model has no affine BatchNorm layer to give per-step weights"
            )
        plain = all(
            isinstance(m, CORE_LAYER_TYPES) or type(m).forward is nn.Sequential.forward
            for m in model.modules()
        )
        return cls(layers, positions, per_step_bn, graph_signature(graph), modules, plain)

    def check_unchanged(self, model: nn.Module) -> None:
        """Raises ValueError if the model no longer computes the graph read at construction:
        a swapped layer, a hook, or a forward that traces differently (e.g. one that branches
        on self.training or on global state)."""
        # One walk over the model's modules checks hooks and that each layer read then is
        # still in its place.
        found = 0
        for name, now in check_no_hooks(model):
            module = self.modules.get(name)
            if module is None:
                continue
            if now is not module:
                found = -1
                break
            found += 1
        if found != len(self.modules):
            changed = next(n for n, m in self.modules.items() if _submodule(model, n) is not m)
            raise ValueError(
                f"model: its layers changed since construction (model.{changed} is not the "
                "layer read then); build a new ModelAwareMAML"
            )
        if self.positions and sequential_positions(model) != self.positions:
            raise ValueError(
                "model: its layers changed since construction; build a new ModelAwareMAML"
            )
        # Plain models have fixed forwards; any other may branch on self.training or on state.
        if not self.plain and graph_signature(trace(model)) != self.signature:
            raise ValueError(
                f"model: {type(model).__name__}.forward traces to a different graph than at "
                "construction (does it branch on self.training or on global state?); "
                "ModelAwareMAML runs the graph it read, so build a new one or use pymeta.MAML"
            )

    @property
    def num_modules(self) -> int:
        return len(self.positions)

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
        Linear, as in ANIL), or a list of module names ("blocks.3.body.0") or, for
        nn.Sequential models, model[i] indices."""
        layers = self.parametric_layers
        if adapt_layers is None:
            return [not self.is_per_step(layer) for layer in layers]
        if adapt_layers == "head":
            linear = [i for i, layer in enumerate(layers) if layer.kind == KINDS["linear"]]
            head = linear[-1] if linear else len(layers) - 1
            return [i == head for i in range(len(layers))]
        if isinstance(adapt_layers, str) or not hasattr(adapt_layers, "__iter__"):
            raise TypeError(
                "adapt_layers: expected None, 'head' or a list of model indices or module names, "
                f"received {adapt_layers!r}"
            )
        by_name = {layer.name: i for i, layer in enumerate(layers)}
        by_position = {layer.position: i for i, layer in enumerate(layers)}
        adapted = [False] * len(layers)
        for index in adapt_layers:
            if isinstance(index, str):
                if index not in by_name:
                    raise ValueError(
                        f"adapt_layers: {index!r} is not a layer with parameters; those are "
                        f"{sorted(by_name)}"
                    )
                i, label = by_name[index], f"model.{index}"
            elif isinstance(index, int) and not isinstance(index, bool) and self.num_modules:
                pos = index + self.num_modules if index < 0 else index
                if pos not in by_position:
                    raise ValueError(
                        f"adapt_layers: model[{index}] has no parameters to adapt; layers with "
                        f"parameters are at indices {sorted(p for p in by_position)}"
                    )
                i, label = by_position[pos], f"model[{index}]"
            else:
                raise TypeError(
                    "adapt_layers: expected int indices (nn.Sequential models) or module names, "
                    f"received {index!r}"
                )
            if self.is_per_step(layers[i]):
                raise ValueError(
                    f"adapt_layers: {label} is a batch norm layer with per-step weights, "
                    "which are meta-learned, not adapted"
                )
            adapted[i] = True
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
            ints += layer_row(layer.kind, layer.flag, is_adapted, extra, layer.inputs)
            args.append(layer.arg)
        return ints, args
