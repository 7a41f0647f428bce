"""Random networks, MAML settings and task batches for the fuzz tests (tests/test_fuzz.py).

Everything is drawn through a ``Chooser`` (integer, choice, boolean, uniform), so the same
samplers serve hypothesis (``HypothesisChooser``: shrinkable, printed on failure) and a plain
``random.Random`` (``RandomChooser``: the crash fuzzing in a subprocess, which must not need
hypothesis). A network is drawn as a *recipe*, a plain dict that prints readably, and built
with ``build_model``.
"""

from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from torch import nn

import pymeta

ACTIVATIONS = ("relu", "leaky", "tanh", "sigmoid", "none")


class RandomChooser:
    """Draws from a ``random.Random``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, options):
        return options[self.rng.randrange(len(options))]

    def boolean(self) -> bool:
        return self.rng.random() < 0.5

    def uniform(self, lo: float, hi: float) -> float:
        return self.rng.uniform(lo, hi)


class HypothesisChooser:
    """Draws through hypothesis' ``draw`` (inside ``st.composite`` or ``st.data()``)."""

    def __init__(self, draw):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def integer(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, options):
        return self.draw(self.st.sampled_from(list(options)))

    def boolean(self) -> bool:
        return self.draw(self.st.booleans())

    def uniform(self, lo: float, hi: float) -> float:
        return self.draw(self.st.floats(lo, hi, allow_nan=False, allow_infinity=False))


# ----------------------------------------------------------------------------- recipes
def activation(c) -> tuple:
    name = c.choice(ACTIVATIONS)
    return (name, round(c.uniform(0.01, 0.5), 3)) if name == "leaky" else (name,)


def mlp_recipe(c) -> dict:
    """An MLP: optional leading Flatten of a 2-d example, 1-3 Linear layers (with or without
    bias), an activation (or none) after each hidden one, optionally nested in a Sequential."""
    flatten = c.boolean()
    example = (c.integer(1, 3), c.integer(1, 3)) if flatten else (c.integer(1, 5),)
    depth = c.integer(1, 3)
    widths = [c.integer(1, 8) for _ in range(depth - 1)] + [c.integer(1, 4)]
    return dict(
        kind="mlp",
        example=example,
        flatten=flatten,
        widths=widths,
        bias=[c.boolean() for _ in widths],
        acts=[activation(c) for _ in widths[:-1]],
        nested=c.boolean(),
        seed=c.integer(0, 2**16),
    )


def _out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def conv_recipe(c) -> dict:
    """A small conv net: 1-2 blocks of Conv2d (stride, padding, bias), optional BatchNorm2d
    (batch statistics, affine or not), optional activation and optional max/avg pooling; then
    Flatten, an optional hidden Linear (+ optional BatchNorm1d, activation) and a Linear head."""
    channels, h, w = c.integer(1, 2), c.integer(3, 7), c.integer(3, 7)
    example = (channels, h, w)
    blocks = []
    for _ in range(c.integer(1, 2)):
        kh, kw = c.integer(1, min(3, h)), c.integer(1, min(3, w))
        conv = dict(
            out=c.integer(1, 3), kernel=(kh, kw), stride=(c.integer(1, 2), c.integer(1, 2)),
            padding=(c.integer(0, kh // 2 + 1), c.integer(0, kw // 2 + 1)), bias=c.boolean(),
        )  # fmt: skip
        h = _out_size(h, kh, conv["stride"][0], conv["padding"][0])
        w = _out_size(w, kw, conv["stride"][1], conv["padding"][1])
        block = dict(conv=conv, bn=c.choice((None, "affine", "plain")), act=activation(c))
        block["pool"] = None
        if min(h, w) >= 2 and c.boolean():
            k = c.integer(1, 2)
            stride, pad = c.integer(1, 2), c.integer(0, k // 2)
            kind = c.choice(("max", "avg"))
            block["pool"] = dict(kind=kind, kernel=k, stride=stride, padding=pad)
            if kind == "avg":
                block["pool"]["count_include_pad"] = c.boolean()
            h, w = _out_size(h, k, stride, pad), _out_size(w, k, stride, pad)
        blocks.append(block)
        if min(h, w) < 1:
            break
    hidden = None
    if c.boolean():
        hidden = dict(width=c.integer(2, 6), bn1d=c.boolean(), act=activation(c))
    return dict(
        kind="conv", example=example, blocks=blocks, hidden=hidden, out=c.integer(1, 4),
        seed=c.integer(0, 2**16),
    )  # fmt: skip


def network_recipe(c) -> dict:
    return mlp_recipe(c) if c.boolean() else conv_recipe(c)


def _activation_module(act: tuple) -> nn.Module:
    name = act[0]
    if name == "leaky":
        return nn.LeakyReLU(act[1])
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "none": nn.Identity}[name]()


def build_model(recipe: dict, dtype=torch.float64) -> tuple[nn.Sequential, tuple, int]:
    """(model, example shape, outputs) for a recipe; None when a conv recipe leaves no pixels."""
    torch.manual_seed(recipe["seed"])
    if recipe["kind"] == "mlp":
        layers: list[nn.Module] = [nn.Flatten()] if recipe["flatten"] else []
        n_in = 1
        for size in recipe["example"]:
            n_in *= size
        for i, (width, bias) in enumerate(zip(recipe["widths"], recipe["bias"])):
            layers.append(nn.Linear(n_in, width, bias=bias))
            if i < len(recipe["acts"]):
                layers.append(_activation_module(recipe["acts"][i]))
            n_in = width
        if recipe["nested"] and len(layers) >= 2:
            layers = [nn.Sequential(*layers[:2]), *layers[2:]]
        return nn.Sequential(*layers).to(dtype), recipe["example"], recipe["widths"][-1]
    layers = []
    channels = recipe["example"][0]
    for block in recipe["blocks"]:
        conv = block["conv"]
        layers.append(
            nn.Conv2d(channels, conv["out"], conv["kernel"], conv["stride"], conv["padding"],
                      bias=conv["bias"])
        )  # fmt: skip
        channels = conv["out"]
        if block["bn"]:
            layers.append(
                nn.BatchNorm2d(channels, affine=block["bn"] == "affine", track_running_stats=False)
            )
        layers.append(_activation_module(block["act"]))
        pool = block["pool"]
        if pool:
            if pool["kind"] == "max":
                layers.append(nn.MaxPool2d(pool["kernel"], pool["stride"], pool["padding"]))
            else:
                layers.append(
                    nn.AvgPool2d(pool["kernel"], pool["stride"], pool["padding"],
                                 count_include_pad=pool["count_include_pad"])
                )  # fmt: skip
    body = nn.Sequential(*layers)
    with torch.no_grad():
        try:
            features = body(torch.zeros(2, *recipe["example"])).flatten(1).shape[1]
        except RuntimeError:
            return None
    layers.append(nn.Flatten())
    hidden = recipe["hidden"]
    if hidden:
        layers.append(nn.Linear(features, hidden["width"]))
        if hidden["bn1d"]:
            layers.append(nn.BatchNorm1d(hidden["width"], track_running_stats=False))
        layers.append(_activation_module(hidden["act"]))
        features = hidden["width"]
    layers.append(nn.Linear(features, recipe["out"]))
    return nn.Sequential(*layers).to(dtype), recipe["example"], recipe["out"]


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def settings_recipe(c) -> dict:
    """MAML settings both variants take, and the batch sizes: T tasks, K support, Q query."""
    return dict(
        loss=c.choice(("mse", "cross_entropy")),
        inner_steps=c.integer(1, 3),
        first_order=c.boolean(),
        inner_lr=round(c.uniform(0.0, 0.5), 4),
        learn_inner_lr=c.choice((False, "scalar", "per_parameter")),
        tasks=c.integer(1, 3),
        k=c.integer(1, 4),
        q=c.integer(1, 4),
        seed=c.integer(0, 2**16),
    )


def make_batch(example, outputs, loss, tasks, k, q, seed, dtype=torch.float64):
    """A TaskBatch of random inputs (T, K|Q, *example) and targets for the loss."""
    g = torch.Generator().manual_seed(seed)

    def x(n):
        return torch.randn(tasks, n, *example, generator=g, dtype=dtype)

    def y(n):
        if loss == "mse":
            return torch.randn(tasks, n, outputs, generator=g, dtype=dtype)
        return torch.randint(0, outputs, (tasks, n), generator=g)

    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def learner_kwargs(s: dict) -> dict:
    keys = ("loss", "inner_steps", "first_order", "inner_lr", "learn_inner_lr")
    return {key: s[key] for key in keys}


def randomize_learned_lrs(pairs, seed: int) -> None:
    """Copies the same random rates (in [0.01, 0.3)) into each pair of rate tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b in pairs:
            value = 0.01 + 0.29 * torch.rand(a.shape, generator=g, dtype=a.dtype)
            a.copy_(value)
            b.copy_(value)


def grad_errors(got: list, want: list) -> list[float]:
    """Per tensor: max |got - want| / max(max |want|, 1e-3 * the largest gradient of all).

    The floor is for gradients that are small only by cancellation of large terms (a conv
    weight or bias before batch norm, exactly scale- or shift-invariant up to eps): any two
    summation orders differ there by rounding of the large terms, not of the result.
    """
    top = max([float(w.abs().max()) for w in want if w.numel()] + [1e-300])
    return [
        float((g - w).abs().max()) / max(float(w.abs().max()), 1e-3 * top)
        for g, w in zip(got, want)
        if w.numel()
    ]


def parametric_positions(model: nn.Sequential, skip_batch_norm: bool = False) -> list[int]:
    """model[i] indices (nested Sequentials flattened) of the layers with parameters."""
    return [
        i
        for i, (_, m) in enumerate(leaves(model))
        if any(True for _ in m.parameters())
        and not (skip_batch_norm and isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    ]


def options_recipe(c, model: nn.Sequential, inner_steps: int) -> dict:
    """ModelAwareMAML's own options: adapt_layers (None, "head", or a random non-empty set of
    indices, some negative), lr_mode, multi_step_loss, per_step_bn (with affine batch norm)."""
    affine_bn = any(
        isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine for m in model.modules()
    )
    per_step_bn = affine_bn and c.boolean()
    positions = parametric_positions(model, skip_batch_norm=per_step_bn)
    adapt = c.choice(("all", "head", "indices"))
    if adapt == "indices":
        n_leaves = len(leaves(model))
        picked = [p for p in positions if c.boolean()] or [c.choice(positions)]
        adapt_layers = [p - n_leaves if c.boolean() else p for p in picked]
    else:
        adapt_layers = None if adapt == "all" else "head"
    multi = c.choice(("last", "mean", "weights"))
    if multi == "weights":
        multi_step_loss = [round(c.uniform(0.0, 1.0), 3) for _ in range(inner_steps)]
        if not any(multi_step_loss):  # all zero is refused (no loss to learn from)
            multi_step_loss[-1] = 1.0
    else:
        multi_step_loss = multi == "mean"
    return dict(
        adapt_layers=adapt_layers,
        lr_mode=c.choice(("scalar", "per_layer_step", "per_parameter")),
        multi_step_loss=multi_step_loss,
        per_step_bn=per_step_bn,
    )


def reordered(batch: pymeta.TaskBatch) -> pymeta.TaskBatch:
    """The same tasks with the examples of every set in reverse order: the same meta-loss and
    meta-gradient in exact arithmetic, a different summation order in floating point."""
    return pymeta.TaskBatch(*(t.flip(1) for t in (batch.support_x, batch.support_y,
                                                   batch.query_x, batch.query_y)))  # fmt: skip


# ----------------------------------------------------------------------------- shared modules
ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def leaves(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the leaves under nested Sequentials, a module used twice at
    both places. Checks nothing: it reads models that ModelAwareMAML refuses too."""
    out = []
    for name, child in model._modules.items():
        if isinstance(child, nn.Sequential):
            out += leaves(child, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", child))
    return out


def nest(c, *layer_lists: list) -> list[nn.Sequential]:
    """Each list of layers (all of one length) in a Sequential, the same random run of them
    (possibly) in a nested Sequential."""
    n = len(layer_lists[0])
    a = b = 0
    if n >= 2 and c.boolean():
        a = c.integer(0, n - 1)
        b = c.integer(a + 1, n)
    return [
        nn.Sequential(*layers[:a], nn.Sequential(*layers[a:b]), *layers[b:]) if b else
        nn.Sequential(*layers)
        for layers in layer_lists
    ]  # fmt: skip


def runs(model: nn.Module, example) -> bool:
    """Whether model(x) works on two examples (float64) of the given shape."""
    with torch.no_grad():
        try:
            model(torch.zeros(2, *example, dtype=torch.float64))
        except (RuntimeError, ValueError, IndexError):  # shapes or ranks that do not fit
            return False
    return True


def _family(m: nn.Module):
    return ELEMENTWISE if isinstance(m, ELEMENTWISE) else type(m)


def share_parameterless(c, model: nn.Sequential, example) -> tuple | None:
    """(shared, twin): the model with one of its parameterless layer objects (activation,
    pooling, Flatten) used at a second place, where it replaces a layer of its family
    (elementwise activation, same pooling type) or is inserted; twin has a copy of the layer
    there instead. None when the draw gives a network that cannot run."""
    layers = [m for _, m in leaves(model)]
    plain = [
        i
        for i, m in enumerate(layers)
        if not any(True for _ in m.parameters()) and not isinstance(m, BATCH_NORM)
    ]
    if not plain:
        return None
    pools = [i for i in plain if isinstance(layers[i], (nn.MaxPool2d, nn.AvgPool2d))]
    m = layers[c.choice(pools if pools and c.boolean() else plain)]  # pools are rarer
    shared, twin = list(layers), list(layers)
    same = [j for j, o in enumerate(layers) if o is not m and _family(o) == _family(m)]
    if same and c.boolean():
        j = c.choice(same)
        shared[j], twin[j] = m, copy.deepcopy(m)
    else:
        j = c.integer(0, len(layers))
        shared.insert(j, m)
        twin.insert(j, copy.deepcopy(m))
    shared, twin = nest(c, shared, twin)
    return (shared, twin) if runs(twin, example) else None


def _shape_preserving_layer(c, shape, with_params: bool) -> nn.Module:
    """A new float64 Linear, Conv2d or batch norm layer whose output has its input's shape
    (N, *shape); with_params: one holding a weight."""
    bias, affine, n = c.boolean(), with_params or c.boolean(), shape[0]
    if len(shape) == 1:
        options = [lambda: nn.Linear(n, n, bias=bias),
                   lambda: nn.BatchNorm1d(n, affine=affine, track_running_stats=False)]  # fmt: skip
    else:
        k = c.choice((1, 3))
        options = [lambda: nn.Conv2d(n, n, k, padding=k // 2, bias=bias),
                   lambda: nn.BatchNorm2d(n, affine=affine, track_running_stats=False)]  # fmt: skip
    return c.choice(options)().to(torch.float64)


def share_parametric(c, model: nn.Sequential, example) -> tuple:
    """(model, first, second, attr): the model with a layer that holds parameters or batch norm
    used at two places (attr None), or two layers holding one Parameter (attr "weight" or
    "bias"); first and second are the qualified names of the two places, in order.

    The shared layer is either a new shape-preserving one (so that the network runs) at two
    places with the same activation shape, or one of the model's own layers inserted at a
    random second place (where the network may not run: the refusal must come first)."""
    layers = [m for _, m in leaves(model)]
    mode = c.choice(("module", "tie", "existing"))
    attr = None
    if mode == "existing":
        i = c.choice(parametric_positions(model))
        j = c.integer(0, len(layers))
        layers.insert(j, layers[i])
        first, second = sorted((i + (j <= i), j))
    else:
        shapes, x = [], torch.zeros(2, *example, dtype=torch.float64)
        with torch.no_grad():
            for m in layers:
                shapes.append(tuple(x.shape[1:]))
                x = m(x)
        shapes.append(tuple(x.shape[1:]))
        # (N, features) or (N, C, H, W), not the (N, a, b) before an MLP's leading Flatten
        p = c.choice([p for p, shape in enumerate(shapes) if len(shape) in (1, 3)])
        q = c.choice([q for q in range(p, len(layers) + 1) if shapes[q] == shapes[p]])
        a = _shape_preserving_layer(c, shapes[p], with_params=mode == "tie")
        b = a
        if mode == "tie":
            b = copy.deepcopy(a)
            attr = c.choice([n for n in ("weight", "bias") if getattr(a, n) is not None])
            setattr(b, attr, getattr(a, attr))
        layers = [*layers[:p], a, *layers[p:q], b, *layers[q:]]
        first, second = p, q + 1
    (model,) = nest(c, layers)
    names = [name for name, _ in leaves(model)]
    return model, names[first], names[second], attr


def leaf_forward(model: nn.Sequential):
    """forward(params, x) for tests/parity.py's reference_meta_loss, written out layer by layer
    (F.linear, F.conv2d, F.batch_norm with batch statistics; parameterless layers run as they
    are). Each Parameter is looked up under the name named_parameters gives it (its first
    place), so a layer used twice or a tied Parameter is one tensor wherever it appears, without
    relying on how functional_call treats sharing."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    layers = [m for _, m in leaves(model)]

    def forward(params, x):
        def get(p):
            return None if p is None else params[name_of[id(p)]]

        for m in layers:
            if isinstance(m, nn.Linear):
                x = F.linear(x, get(m.weight), get(m.bias))
            elif isinstance(m, nn.Conv2d):
                x = F.conv2d(x, get(m.weight), get(m.bias), m.stride, m.padding)
            elif isinstance(m, BATCH_NORM):
                x = F.batch_norm(x, None, None, get(m.weight), get(m.bias), True, 0.0, m.eps)
            else:
                x = m(x)
        return x

    return forward


# ----------------------------------------------------------------------------- hooks
_HOOKS = {
    "forward hook": lambda m: m.register_forward_hook(lambda mod, i, o: o),
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda mod, i: None),
    "backward hook": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
}


def add_hook(c, model: nn.Module) -> tuple[str, str]:
    """Registers a random hook (a no-op: any hook is refused, whatever it does) on a random
    module, the model and nested Sequentials included. Returns (qualified name, hook kind)."""
    name, module = c.choice(list(model.named_modules()))
    kind = c.choice(list(_HOOKS))
    _HOOKS[kind](module)
    return name, kind


def subclass_in_place(c, model: nn.Module) -> str:
    """Turns a random module (a layer, the model or a nested Sequential) into an instance of a
    subclass of its type with its own forward, which computes what the type's does. Returns
    the module's qualified name."""
    name, module = c.choice(list(model.named_modules()))
    cls = type(module)
    module.__class__ = type(f"Own{cls.__name__}", (cls,), {"forward": _forward_of(cls)})
    return name


def _forward_of(cls):
    return lambda self, x: cls.forward(self, x)


# ----------------------------------------------------------------------------- invalid calls
def _unsupported_layer(c) -> nn.Module:
    return c.choice((
        lambda: nn.Dropout(0.1), lambda: nn.LayerNorm(3), lambda: nn.Conv1d(1, 2, 1),
        lambda: nn.BatchNorm2d(2), lambda: nn.Conv2d(2, 2, 3, groups=2),
        lambda: nn.Conv2d(1, 2, 3, dilation=2), lambda: nn.Conv2d(1, 2, 3, padding="same"),
        lambda: nn.MaxPool2d(2, ceil_mode=True), lambda: nn.AvgPool2d(2, divisor_override=3),
        lambda: nn.Flatten(0), lambda: nn.GELU(), lambda: nn.Softmax(-1),
    ))()  # fmt: skip


def invalid_constructor(c, model: nn.Sequential) -> tuple[str, dict | nn.Module]:
    """(argument name, bad ModelAwareMAML keyword arguments or a bad model)."""
    name = c.choice((
        "inner_steps", "inner_lr", "lr_mode", "learn_inner_lr", "adapt_layers", "loss",
        "multi_step_loss", "per_step_bn", "track_bn_stats", "model",
    ))  # fmt: skip
    if name == "inner_steps":
        return name, {name: c.choice((0, -1, 1.5, True, "2", None))}
    if name == "inner_lr":
        return name, {name: c.choice((float("nan"), float("inf"), -0.1, "0.1", True, None))}
    if name == "lr_mode":
        return name, {name: c.choice(("per_layer", "", None, 1))}
    if name == "learn_inner_lr":
        return name, {name: c.choice(("per_layer_step", "yes", 1, None))}
    if name == "adapt_layers":
        n_leaves = len(leaves(model))
        plain = [i for i in range(n_leaves) if i not in parametric_positions(model)]
        bad = [[], "tail", 3, [1.5], [True], [n_leaves + c.integer(0, 3)], [-n_leaves - 1]]
        if plain:
            bad.append([c.choice(plain)])
        return name, {name: c.choice(bad)}
    if name == "loss":
        return name, {name: c.choice(("hinge", "MSE", 3, None))}
    if name == "multi_step_loss":
        return name, {
            "inner_steps": 2,
            name: c.choice(
                (
                    [1.0],
                    [1.0, 2.0, 3.0],
                    [float("nan"), 1.0],
                    3,
                    None,
                    ["a", 1],
                    [0.0, 0.0],
                    [1.0, -1.0],
                )
            ),
        }
    if name in ("per_step_bn", "track_bn_stats"):
        return name, {name: c.choice(("yes", 1, None))}
    layers = list(leaves(model))
    position = c.integer(0, len(layers))
    modules = [m for _, m in layers]
    modules.insert(position, _unsupported_layer(c))
    return "model", nn.Sequential(*modules)


def invalid_batch_parts(
    c, example, outputs, loss, dtype=torch.float64, min_set: int = 1
) -> tuple[str, dict]:
    """(field named in the error, TaskBatch parts with one random defect). Sets hold at least
    ``min_set`` examples (2 for batch norm, which refuses one value per channel)."""
    t, k, q = c.integer(1, 3), c.integer(min_set, 3), c.integer(min_set, 3)
    parts = make_batch(example, outputs, loss, t, k, q, c.integer(0, 99), dtype).__dict__.copy()
    field = c.choice(("support_x", "support_y", "query_x", "query_y"))
    x = parts[field]
    defect = c.choice(("tasks", "examples", "empty", "dtype", "nonfinite", "shape", "labels"))
    if defect == "tasks":
        parts[field] = torch.cat([x, x[:1]]) if c.boolean() or t == 1 else x[:-1]
        if field == "support_x":  # then the others disagree with it
            field = "support_y"
    elif defect == "examples" and field.endswith("_y"):
        parts[field] = torch.cat([x, x[:, :1]], 1)
    elif defect in ("empty", "examples"):
        side = field.split("_")[0]
        for name in (side + "_x", side + "_y"):
            parts[name] = parts[name][:, :0]
        field = side + "_x"
    elif defect == "dtype":
        if field.endswith("_x"):
            parts[field] = x.to(c.choice((torch.float32, torch.int64, torch.float16)))
        else:
            for name in ("support_y", "query_y"):  # both: TaskBatch wants them alike
                y = parts[name]
                parts[name] = y.float() if loss == "cross_entropy" else y.long()
            field = "support_y"
    elif defect == "nonfinite" and x.is_floating_point():
        x = x.clone()
        bad = c.choice((float("nan"), float("inf"), -float("inf")))
        x.view(-1)[c.integer(0, x.numel() - 1)] = bad
        parts[field] = x
    elif defect == "labels" and loss == "cross_entropy":
        y = parts["support_y"].clone()
        y.view(-1)[c.integer(0, y.numel() - 1)] = c.choice((outputs, outputs + 5, -1, -100))
        parts["support_y"], field = y, "support_y"
    else:  # one more feature (or image channel) in every input: the model cannot take it
        dim = 2 if len(example) == 3 else -1
        for name in ("support_x", "query_x"):
            parts[name] = torch.cat([parts[name], parts[name].narrow(dim, 0, 1)], dim)
        field = "support_x"
    return field, parts


# ----------------------------------------------------------------------------- crash fuzzing
def _bad_tensor(c, like: torch.Tensor) -> torch.Tensor:
    """A tensor like ``like`` but with one random defect (shape, dtype, device, layout)."""
    defect = c.choice(("shape", "dtype", "meta", "empty", "noncontiguous", "scalar", "nan"))
    if defect == "shape":
        return torch.randn(*[c.integer(0, 4) for _ in range(c.integer(0, 5))], dtype=like.dtype)
    if defect == "dtype":
        return like.to(c.choice((torch.float32, torch.float16, torch.int64, torch.int32)))
    if defect == "meta":
        return torch.empty_like(like, device="meta")
    if defect == "empty":
        return like.new_empty((0, *like.shape[1:]))
    if defect == "noncontiguous" and like.dim() >= 2:
        return like.transpose(0, -1)
    if defect == "nan" and like.is_floating_point() and like.numel():
        return torch.full_like(like, float("nan"))
    return torch.tensor(1.5, dtype=like.dtype)


def _mutate_list(c, items: list, make_bad) -> list:
    items = list(items)
    action = c.choice(("drop", "extra", "replace", "empty"))
    if action == "drop" and items:
        items.pop(c.integer(0, len(items) - 1))
    elif action == "extra":
        items.append(make_bad(items[-1]) if items else 1)
    elif action == "replace" and items:
        i = c.integer(0, len(items) - 1)
        items[i] = make_bad(items[i])
    else:
        items = []
    return items


def raw_op_call(c) -> tuple[str, object]:
    """(description, thunk): one ``torch.ops.pymeta`` op with arguments built for a random
    network and then broken in 1-3 random ways."""
    recipe = network_recipe(c)
    out = build_model(recipe, c.choice((torch.float32, torch.float64)))
    if out is None:
        return "skip", lambda: None
    model, example, outputs = out
    loss = c.choice(("mse", "cross_entropy"))
    dtype = next(model.parameters()).dtype
    batch = make_batch(example, outputs, loss, c.integer(1, 2), 2, 2, c.integer(0, 99), dtype)
    maml = pymeta.ModelAwareMAML(model, loss=loss, inner_steps=c.integer(1, 2))
    args = list(maml._core_args(batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    args[0] = [p.detach() for p in args[0]]
    names = ["params", "lrs", "support_x", "support_y", "query_x", "query_y", "layers",
             "layer_args", "step_weights", "lr_mode", "loss"]  # fmt: skip
    broken = []
    for _ in range(c.integer(1, 3)):
        i = c.integer(0, len(names) - 1)
        broken.append(names[i])
        value = args[i]
        if i in (0, 1):
            args[i] = _mutate_list(c, value, lambda t: _bad_tensor(c, t))
        elif i <= 5:
            args[i] = _bad_tensor(c, value)
        elif i == 6:
            value = list(value)
            if value and c.boolean():
                value[c.integer(0, len(value) - 1)] = c.integer(-3, 12)
                args[i] = value
            else:
                args[i] = _mutate_list(c, value, lambda v: c.integer(-3, 12))
        elif i in (7, 8):
            bad = c.choice((float("nan"), -1.0, 0.0, 1e30))
            args[i] = _mutate_list(c, list(value), lambda v: bad)
        else:
            args[i] = c.integer(-2, 4)
    layered = maml.core_kind == "layered"
    if c.boolean():
        op = torch.ops.pymeta.net_maml_loss if layered else torch.ops.pymeta.net_maml_loss
        flags = (c.boolean(), c.boolean(), c.boolean())
        thunk = lambda: op(*args, *flags)  # noqa: E731
    else:
        op = torch.ops.pymeta.net_adapt if layered else torch.ops.pymeta.net_adapt
        steps = c.integer(-1, 3)
        thunk = lambda: op(*args[:4], args[6], args[7], steps, args[9], args[10])  # noqa: E731
    return f"{op} broken: {broken}", thunk


def sgd_update_call(c) -> tuple[str, object]:
    """(description, thunk): sgd_update / sgd_update_backward on random, mismatched lists."""
    shape = [c.integer(1, 3) for _ in range(c.integer(1, 3))]
    n = c.integer(1, 3)
    params = [torch.randn(*shape) for _ in range(n)]
    grads = [torch.randn(*shape) for _ in range(n)]
    lrs = [torch.tensor(0.1)]
    for _ in range(c.integer(1, 2)):
        which = c.choice((params, grads, lrs))
        which[:] = _mutate_list(c, which, lambda t: _bad_tensor(c, t))
    if c.boolean():
        return "sgd_update", lambda: torch.ops.pymeta.sgd_update(params, grads, lrs)
    flag = c.boolean()
    return "sgd_update_backward", lambda: torch.ops.pymeta.sgd_update_backward(
        grads, params, lrs, flag
    )


def learner_call(c) -> tuple[str, object]:
    """(description, thunk): a public-API call, valid or with one random defect."""
    recipe = network_recipe(c)
    out = build_model(recipe)
    if out is None:
        return "skip", lambda: None
    model, example, outputs = out
    s = settings_recipe(c)
    kind = c.choice(("valid", "constructor", "batch"))

    def valid():
        batch = make_batch(example, outputs, s["loss"], s["tasks"], max(2, s["k"]), 2, s["seed"])
        for cls in (pymeta.ModelAwareMAML, pymeta.MAML):
            maml = cls(model, **learner_kwargs(s))
            maml.meta_loss(batch).backward()
            maml.adapt(batch.support_x, batch.support_y, batched=True)(batch.query_x)

    if kind == "valid":
        return f"valid {recipe['kind']}", valid
    if kind == "constructor":
        name, bad = invalid_constructor(c, model)
        if name == "model":
            return "unsupported layer", lambda: pymeta.ModelAwareMAML(bad)
        return f"bad {name}", lambda: pymeta.ModelAwareMAML(model, **bad)
    min_set = 2 if has_batch_norm(model) else 1
    field, parts = invalid_batch_parts(c, example, outputs, s["loss"], min_set=min_set)

    def bad_batch():
        batch = pymeta.TaskBatch(**parts)
        pymeta.ModelAwareMAML(model, loss=s["loss"]).meta_loss(batch)

    return f"bad {field}", bad_batch


def crash_fuzz(seed: int, seconds: float, log=None) -> int:
    """Makes random valid and invalid calls (public API and raw ops) for ``seconds``; Python
    exceptions are expected and counted, anything else (a crash) ends the process. Each call's
    description is written to ``log`` first, so the last line names a crashing call.

    Returns:
        The number of calls made.
    """
    import sys
    import time

    log = log or sys.stdout
    c = RandomChooser(random.Random(seed))
    end, calls = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        make = c.choice((raw_op_call, raw_op_call, sgd_update_call, learner_call))
        try:
            what, thunk = make(c)
        except Exception:  # an invalid recipe: nothing was called into the core yet
            continue
        print(f"call {calls}: {what}", file=log, flush=True)
        try:
            result = thunk()
            if isinstance(result, (list, tuple)):  # touch the outputs: garbage must not crash
                for t in result:
                    if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                        t.sum()
        except Exception:
            pass
        calls += 1
    return calls


if __name__ == "__main__":
    import sys

    print(f"calls: {crash_fuzz(int(sys.argv[1]), float(sys.argv[2]))}", flush=True)
