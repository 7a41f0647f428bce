"""pymeta.ModelAwareMAML on networks that are graphs, not chains (issue 12): residual blocks
(projection, identity and in-place shortcuts), channel concatenation, functional forms of the
supported layers and a tiny ResNet-12, exact in float64 against pymeta.MAML and a per-task
autograd loop under every option; and the errors of the torch.fx reader
(pymeta/model_aware/net_spec.py)."""

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, randomize_lrs, reference_loss, reference_meta_loss, rel_err
from test_model_aware_conv import (
    assert_close_grads,
    batch_for,
    bn,
    check_per_step_batch_norm,
    grads_of,
)
from torch import nn

import pymeta
from pymeta import _C

TOL = 1e-10
LOSS_FNS = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}


# ----------------------------------------------------------------------------- networks
def conv(c_in, c_out, k=3, bias=True):
    return nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)


class ResBlock(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN body, 1x1 conv + BN shortcut, then ReLU."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(conv(c_in, c_out), bn(c_out), nn.ReLU(), conv(c_out, c_out))
        self.body.append(bn(c_out))
        self.shortcut = nn.Sequential(conv(c_in, c_out, 1, bias=False), bn(c_out))
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.body(x)
        out = out + self.shortcut(x)
        return self.relu(out)


class IdentityBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv(c, c), bn(c), nn.Tanh())

    def forward(self, x):
        return F.relu(self.body(x) + x)


class InPlaceBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv(c, c), nn.LeakyReLU(0.1))

    def forward(self, x):
        out = self.body(x)
        out += x
        return out


class Dense(nn.Module):
    """DenseNet-like: the input concatenated with a conv of it, then a 3-way concatenation."""

    def __init__(self, c):
        super().__init__()
        self.conv = conv(c, 2)
        self.a = nn.Sequential(conv(c + 2, 2), bn(2), nn.ReLU())
        self.b = conv(c + 2, 1, 1)

    def forward(self, x):
        x = torch.cat([x, self.conv(x)], 1)
        a, b = self.a(x), self.b(x)
        return torch.cat([x, a, b], dim=1)


class Functional(nn.Module):
    """Every functional spelling of activations, global pooling and flattening."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = conv(2, 3), conv(3, 3), conv(3, 3)
        self.norm = bn(3)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.pool = nn.MaxPool2d(4)
        self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))
        a = F.leaky_relu(self.c2(h), 0.2)
        b = torch.tanh(self.norm(self.c3(h))).relu()
        a = F.adaptive_avg_pool2d(a, 1)
        a = a.view(a.size(0), -1)
        g = self.gap(b)
        g = g.reshape(g.shape[0], -1)
        p = torch.flatten(self.pool(b), 1)
        return self.fc1(a + g) + self.fc2(p)


def graph_net(name, seed=0):
    """(model, example shape): tiny float64 graph networks on 8x8 images."""
    torch.manual_seed(seed)
    if name == "residual":  # projection shortcut, in a Sequential with pooling and a head
        model = nn.Sequential(ResBlock(1, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 3))
        return model.double(), (1, 8, 8)
    if name == "identity-residual":  # identity shortcuts: F.relu(body(x) + x) and out += x
        model = nn.Sequential(
            conv(2, 3), IdentityBlock(3), nn.MaxPool2d(2), InPlaceBlock(3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3),
        )  # fmt: skip
        return model.double(), (2, 8, 8)
    if name == "dense":
        model = nn.Sequential(Dense(2), nn.MaxPool2d(4), nn.Flatten(), nn.Linear(28, 3))
        return model.double(), (2, 8, 8)
    if name == "functional":
        return Functional().double(), (2, 8, 8)
    raise KeyError(name)


NETS = ["residual", "identity-residual", "dense", "functional"]


def test_the_graph_nets_run_in_the_layered_core_as_graphs():
    # Not vacuous: each net reaches the core as a graph with the nodes it is meant to test.
    kinds = {v: k for k, v in pymeta.model_aware.net_spec.KINDS.items()}
    want = {
        "residual": {"add": 1},
        "identity-residual": {"add": 2, "global_avgpool": 1},
        "dense": {"concat": 3},  # the 3-way cat is two two-input concats
        "functional": {"add": 2, "global_avgpool": 2, "flatten": 3, "activation": 4},
    }
    for name, counts in want.items():
        model, example = graph_net(name)
        maml = pymeta.ModelAwareMAML(model)
        assert maml.core_kind == "layered"
        got = [kinds[layer.kind] for layer in maml.spec.layers]
        assert {k: got.count(k) for k in counts} == counts, (name, got)
        x = torch.randn(2, *example, dtype=torch.float64)
        assert model(x).shape == (2, 3)


# ----------------------------------------------------------------------------- exactness
def assert_matches_maml_and_reference(model, batch, steps, first_order, loss, lr=0.3):
    """Loss and every meta-gradient of ModelAwareMAML equal pymeta.MAML's and the per-task
    autograd loop's."""
    kwargs = dict(inner_lr=lr, inner_steps=steps, first_order=first_order, loss=loss)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    assert aware.core_kind == "layered"
    params = list(model.parameters())
    got = aware.meta_loss(batch)
    grads = grads_of(got, params)
    for want in (
        agnostic.meta_loss(batch),
        reference_meta_loss(model, batch, [lr], steps, first_order, LOSS_FNS[loss]),
    ):
        assert rel_err(got, want) < TOL
        assert_close_grads(grads, grads_of(want, params))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_equals_model_agnostic_maml_and_the_per_task_loop(net, steps, first_order, loss):
    model, example = graph_net(net)
    assert_matches_maml_and_reference(model, batch_for(example, loss), steps, first_order, loss)


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_match_autograd_reference(net, lr_mode, first_order):
    model, example = graph_net(net, seed=1)
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, first_order=first_order, loss="cross_entropy", lr_mode=lr_mode,
        learn_inner_lr=True,
    )  # fmt: skip
    randomize_lrs(maml, low=0.05, width=0.3)
    batch = batch_for(example, "cross_entropy")
    params = list(maml.parameters())  # the module's and the rates
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    grads = grads_of(got, params)
    assert_close_grads(grads, grads_of(want, params))
    assert all(float(g.abs().max()) > 0 for g in grads[-len(maml.inner_lrs()) :])


HEAD = {"residual": "3", "identity-residual": "6", "dense": "3", "functional": "fc2"}
ADAPT = {  # adapt_layers by module names: a block's inner layers, its shortcut, the head
    "residual": ["0.body.0", "0.shortcut.1", "3"],
    "identity-residual": ["1.body.0", "3.body.0"],
    "dense": ["0.conv", "0.a.1"],
    "functional": ["c2", "norm", "fc2"],
}


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("adapt_layers", ["head", "names"])
@pytest.mark.parametrize("first_order", [False, True])
def test_adapt_layers_match_autograd_reference(net, adapt_layers, first_order):
    model, example = graph_net(net, seed=2)
    layers = ADAPT[net] if adapt_layers == "names" else "head"
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, first_order=first_order, loss="cross_entropy",
        adapt_layers=layers, lr_mode="per_parameter", learn_inner_lr=True,
    )  # fmt: skip
    names = [layer.name for layer, a in zip(maml._param_layers(), maml.adapted) if a]
    assert names == (ADAPT[net] if adapt_layers == "names" else [HEAD[net]])
    randomize_lrs(maml, low=0.05, width=0.3)
    batch = batch_for(example, "cross_entropy")
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads_of(got, params), grads_of(want, params))


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("first_order", [False, True])
def test_per_step_batch_norm_matches_autograd_reference(net, first_order):
    check_per_step_batch_norm(*graph_net(net, seed=3), first_order)


@pytest.mark.parametrize("net", NETS)
def test_adapt_matches_model_agnostic_adapt(net):
    model, example = graph_net(net)
    kwargs = dict(inner_lr=0.2, inner_steps=3, loss="cross_entropy")
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    b = batch_for(example, "cross_entropy")
    for steps in (1, 3):
        got = aware.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        want = agnostic.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        assert rel_err(got, want) < TOL
    one = aware.adapt(b.support_x[0], b.support_y[0])  # a single task, no task dimension
    assert rel_err(one(b.query_x[0]), aware.adapt(b.support_x, b.support_y)(b.query_x)[0]) < TOL


# ----------------------------------------------------------------------------- ResNet-12
def tiny_resnet12():
    torch.manual_seed(0)
    return pymeta.models.resnet12(3, in_channels=1, widths=(2, 3, 4, 5), image_size=16).double()


@pytest.mark.parametrize(
    "steps, first_order, loss", [(2, False, "mse"), (3, True, "cross_entropy")]
)
def test_resnet12_equals_maml_and_the_per_task_loop(steps, first_order, loss):
    batch = batch_for((1, 16, 16), loss, tasks=2, k=3, q=3)
    assert_matches_maml_and_reference(tiny_resnet12(), batch, steps, first_order, loss, lr=0.1)


def test_resnet12_options_match_autograd_reference():
    # Named blocks' layers adapt with learned per-step rates and per-step batch norm.
    model = tiny_resnet12()
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, loss="cross_entropy", lr_mode="per_layer_step",
        learn_inner_lr=True, multi_step_loss=True, per_step_bn=True,
        adapt_layers=["0.body.0", "0.shortcut.0", "2.body.3", "3.body.6", "6"],
    )  # fmt: skip
    randomize_lrs(maml, low=0.05, width=0.2)
    batch = batch_for((1, 16, 16), "cross_entropy", tasks=2, k=3, q=3)
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads_of(got, params), grads_of(want, params))


# ----------------------------------------------------------------------------- errors
class Wrap(nn.Module):
    """conv(c_in, 2) then `op` in this module's own forward."""

    def __init__(self, op, c_in=1):
        super().__init__()
        self.conv = conv(c_in, 2)
        self.op = op

    def forward(self, x):
        return self.op(self, self.conv(x))


def head(*body):
    return nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))


@pytest.mark.parametrize(
    "op, node",
    [
        (lambda m, x: F.gelu(x), r"node 'gelu' \(call_function gelu\)"),
        (lambda m, x: x * 2, r"node 'mul' \(call_function mul\)"),
        (
            lambda m, x: x.mean(1, keepdim=True).expand(-1, 2, -1, -1),
            r"node 'mean' \(call_method mean\)",
        ),
        (lambda m, x: x.sum() + x, r"node 'sum_1' \(call_method sum\)"),  # fx renames sum
    ],
)
def test_an_unsupported_node_is_named_with_the_forward_it_is_in(op, node):
    model = head(nn.ReLU(), Wrap(op, c_in=2))
    with pytest.raises(ValueError, match=node + r" in the forward of model\.1 \(Wrap\): not") as e:
        pymeta.ModelAwareMAML(model)
    assert str(e.value).endswith("use pymeta.MAML, which takes any nn.Module")
    assert pymeta.MAML(model).module is model  # the model-agnostic learner takes it


def test_concatenation_along_another_dim_is_refused():
    model = head(Wrap(lambda m, x: torch.cat([x, x], 2)))
    with pytest.raises(
        ValueError,
        match=r"node 'cat' \(call_function cat\) in the forward of model\.0 \(Wrap\): not "
        r"supported by ModelAwareMAML \(only concatenation along dim=1, received 2\)",
    ):
        pymeta.ModelAwareMAML(model)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x, y):
        return self.fc(x) + y


class DirectParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.weight = nn.Parameter(torch.randn(2, 2))

    def forward(self, x):
        return self.fc(x) @ self.weight


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv(2, 2)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


@pytest.mark.parametrize(
    "model, match",
    [
        (TwoInputs(), r"model: TwoInputs\.forward takes 2 inputs; ModelAwareMAML runs networks "
         r"of one input tensor; use pymeta\.MAML"),
        (DirectParameter(), r"node 'weight' \(get_attr weight\) in the forward of model "
         r"\(DirectParameter\): not supported by ModelAwareMAML \(it reads a parameter or "
         r"buffer directly\)"),
        (head(conv(1, 2), Shared()), r"model\.1\.conv \(Conv2d\) is called twice, the same "
         r"nn\.Conv2d \(one module used twice\); .*shared "
         r"layers are not supported; use pymeta\.MAML"),
        (DataDependent(), r"model: torch\.fx could not trace DataDependent\.forward "
         r"\(TraceError: .*control flow\); .*use pymeta\.MAML"),
    ],
    ids=["two-inputs", "get_attr", "module-used-twice", "untraceable"],
)  # fmt: skip
def test_graphs_the_core_cannot_run_are_refused(model, match):
    with pytest.raises(ValueError, match=match):
        pymeta.ModelAwareMAML(model)


class TrainOnly(nn.Module):
    """A branch that exists only in training mode: fx reads the mode at trace time."""

    def __init__(self):
        super().__init__()
        self.conv, self.a = conv(1, 2), conv(2, 2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2, 3)

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            x = x + self.a(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def test_a_forward_that_traces_differently_is_refused():
    torch.manual_seed(0)
    model = TrainOnly().double()
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for((1, 8, 8), "cross_entropy")
    before = maml.meta_loss(b)
    model.eval()
    match = r"model: TrainOnly\.forward traces to a different graph than at construction"
    with pytest.raises(ValueError, match=match):
        maml.meta_loss(b)
    with pytest.raises(ValueError, match=match):
        maml.adapt(b.support_x, b.support_y)
    model.train()  # the graph read at construction again
    assert rel_err(maml.meta_loss(b), before) == 0


class TrainOnlyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(2, 2)

    def forward(self, x):
        if self.training:
            x = x + self.a(x)
        return x


def test_a_block_that_traces_differently_inside_a_sequential_is_refused():
    torch.manual_seed(0)
    model = head(conv(1, 2), TrainOnlyBlock()).double()
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for((1, 8, 8), "cross_entropy")
    model.eval()
    # pymeta.MAML runs the eval graph (no branch): the core must refuse or agree, not differ.
    with pytest.raises(ValueError, match=r"traces to a different graph than at construction"):
        maml.meta_loss(b)


@pytest.mark.parametrize("net, swap", [("residual", "0.body.0"), ("functional", "c2")])
def test_a_swapped_submodule_is_refused(net, swap):
    model, example = graph_net(net)
    maml = pymeta.ModelAwareMAML(model, loss="mse")
    old = model.get_submodule(swap)
    parent, _, name = swap.rpartition(".")
    new = conv(old.in_channels, old.out_channels).double()
    setattr(model.get_submodule(parent) if parent else model, name, new)
    b = batch_for(example, "mse")
    match = rf"model: its layers changed since construction \(model\.{swap} is not the layer"
    with pytest.raises(ValueError, match=match):
        maml.meta_loss(b)
    with pytest.raises(ValueError, match=match):
        maml.adapt(b.support_x, b.support_y)


# ------------------------------------------------------------------ checkpointed forwards
@pytest.mark.parametrize("net", ["residual", "dense", "resnet12"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("limit", [1000, 40_000])
def test_checkpointed_forwards_give_the_same_meta_gradient(net, first_order, limit):
    """Under a small activation cache limit, passes differentiated once (the query's, and the
    inner steps' of first-order MAML) keep only the values at cut points and recompute the
    others in backward, segment by segment; a replay keeps a quarter of the limit and restarts
    later replays from what it kept (inside residual blocks too). The sweep also recomputes
    passes and iterates. Losses and meta-gradients are those of the default run, which match
    pymeta.MAML."""
    model, example = (tiny_resnet12(), (1, 16, 16)) if net == "resnet12" else graph_net(net)
    kwargs = dict(inner_steps=3, first_order=first_order, loss="cross_entropy", inner_lr=0.3)
    maml = pymeta.ModelAwareMAML(model, **kwargs)
    b = batch_for(example, "cross_entropy")
    params = list(model.parameters())
    want = maml.meta_loss(b)
    want_grads = torch.autograd.grad(want, params)
    default = _C.activation_cache_limit()
    before = _C.recomputed_layers()
    _C.set_activation_cache_limit(limit)
    try:
        got = maml.meta_loss(b)
        grads = torch.autograd.grad(got, params)
    finally:
        _C.set_activation_cache_limit(default)
    assert _C.recomputed_layers() > before
    assert rel_err(got, want) < 1e-13
    scale = max(float(w.abs().max()) for w in want_grads)
    assert max(float((g - w).abs().max()) for g, w in zip(grads, want_grads)) / scale < 1e-12
    agnostic = pymeta.MAML(model, **kwargs).meta_loss(b)
    assert rel_err(got, agnostic) < TOL


def conv_forwards(maml, batch):
    """aten::convolution calls of one meta-loss (the core's forwards, R-forwards and replays)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        maml.meta_loss(batch)
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


class PlainBlock(nn.Module):
    """relu(body(x) + x), body = conv-BN-ReLU-conv-BN: the shortcut reaches across the body, so
    the body's values are no cut points and a checkpointed forward may free them."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(conv(c, c), bn(c), nn.ReLU(), conv(c, c), bn(c))

    def forward(self, x):
        return F.relu(self.body(x) + x)


def test_a_checkpointed_query_frees_elementwise_values_before_convolution_outputs():
    """On 30 query images every value is S bytes. Over 5.5 S (at the flatten) the query's
    forward frees the body's ReLU output, made by an elementwise layer, and keeps both body
    convolution outputs, so backward gets it back by batch norm and ReLU alone: as many
    convolutions as with nothing freed. (Freeing every freeable value, as before, would free
    the second convolution's output too, and run both body convolutions again.) Under 0 it
    frees everything it may, and backward runs convolutions again."""
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 8), PlainBlock(8), nn.Flatten(), nn.Linear(512, 3)).double()
    maml = pymeta.ModelAwareMAML(model, inner_steps=1, loss="cross_entropy", inner_lr=0.3)
    b = batch_for((3, 8, 8), "cross_entropy", tasks=1, k=2, q=30)
    value_bytes = 30 * 8 * 8 * 8 * 8  # (30, 8, 8, 8) float64
    params = list(model.parameters())
    want = maml.meta_loss(b)
    want_grads = torch.autograd.grad(want, params)
    default = _C.activation_cache_limit()
    counts = {}
    try:
        for limit in (2**30, int(5.5 * value_bytes), 0):
            _C.set_activation_cache_limit(limit)
            before = _C.recomputed_layers()
            counts[limit] = (conv_forwards(maml, b), _C.recomputed_layers() - before)
            got = maml.meta_loss(b)
            assert rel_err(got, want) < 1e-13
            assert_close_grads(torch.autograd.grad(got, params), want_grads)
    finally:
        _C.set_activation_cache_limit(default)
    (convs, recomputed), (convs_mid, recomputed_mid), (convs_none, _) = counts.values()
    assert recomputed == 0 and recomputed_mid == 2, counts  # batch norm and ReLU
    assert convs_mid == convs, counts
    assert convs_none > convs, counts


def test_bad_adapt_layers_name_the_argument():
    model, _ = graph_net("residual")
    with pytest.raises(ValueError, match=r"adapt_layers: 'nope' is not a layer with parameters"):
        pymeta.ModelAwareMAML(model, adapt_layers=["nope"])
    functional, _ = graph_net("functional")  # not an nn.Sequential: no model[i] indices
    with pytest.raises(TypeError, match=r"adapt_layers: expected int indices \(nn.Sequential"):
        pymeta.ModelAwareMAML(functional, adapt_layers=[0])
