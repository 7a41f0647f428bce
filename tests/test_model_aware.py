"""pymeta.ModelAwareMAML: parity with pymeta.MAML and with plain autograd references (float64),
the core ops' gradients, adaptation, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, randomize_lrs, reference_loss, rel_err, sinusoid_mse_before_after
from torch import nn

import pymeta
from pymeta import _C

TOL = 1e-10


@pytest.fixture(params=["cached", "recomputed"])
def sweep(request):
    """Runs a test with the inner loop's activations kept for the reverse sweep (the default
    under the memory cap) and with the sweep recomputing them (cap 0)."""
    default = _C.activation_cache_limit()
    if request.param == "recomputed":
        _C.set_activation_cache_limit(0)
    yield request.param
    _C.set_activation_cache_limit(default)


ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "none": nn.Identity,
}


def mlp(widths, act="relu", bias=True, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).double()


def batch_for(widths, loss, tasks=4, k=6, q=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, widths[0], generator=g, dtype=torch.float64)  # noqa: E731
    if loss == "mse":
        y = lambda n: torch.randn(tasks, n, widths[-1], generator=g, dtype=torch.float64)  # noqa: E731
    else:
        y = lambda n: torch.randint(0, widths[-1], (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def grads_of(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


def assert_close_grads(got, want):
    for g, w in zip(got, want):
        g = torch.zeros_like(w) if g is None else g
        assert rel_err(g, w) < TOL or float((g - w).abs().max()) < 1e-14, rel_err(g, w)


# ----------------------------------------------------------------------------- parity with MAML
@pytest.mark.parametrize("steps", [1, 3, 5])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_equals_model_agnostic_maml(steps, first_order, loss, sweep):
    widths = (3, 16, 12, 4)
    model = mlp(widths, "tanh")
    aware = pymeta.ModelAwareMAML(
        model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss
    )
    agnostic = pymeta.MAML(
        model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss=loss
    )
    batch = batch_for(widths, loss, k=4, q=9)  # more query than support rows
    params = list(model.parameters())
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(grads_of(la, params), grads_of(lb, params))


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("widths", [(2, 8, 1), (5, 32, 32, 32, 3), (1, 40, 40, 1)])
def test_equals_maml_each_activation_depth_width(act, widths):
    loss = "mse" if widths[-1] == 1 else "cross_entropy"
    model = mlp(widths, act)
    kwargs = dict(inner_lr=0.05, inner_steps=2, loss=loss, learn_inner_lr=True)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    with torch.no_grad():
        aware.inner_lr.lr.fill_(0.07)
        agnostic.inner_lr.lr.fill_(0.07)
    batch = batch_for(widths, loss)
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(
        grads_of(la, list(aware.parameters())), grads_of(lb, list(agnostic.parameters()))
    )


def test_equals_maml_without_biases_and_with_flatten():
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(6, 10, bias=False),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(10, 3, bias=False),
    ).double()
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.randn(3, n, 2, 3, generator=g, dtype=torch.float64)  # noqa: E731
    y = lambda n: torch.randint(0, 3, (3, n), generator=g)  # noqa: E731
    batch = pymeta.TaskBatch(x(5), y(5), x(4), y(4))
    kwargs = dict(inner_lr=0.3, inner_steps=3, loss="cross_entropy")
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(
        grads_of(la, list(model.parameters())), grads_of(lb, list(model.parameters()))
    )


# ----------------------------------------------------------------------------- spec options
@pytest.mark.parametrize("adapt_layers", [None, "head", [0], [2, 4], [-1]])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_spec_options_match_autograd_reference(adapt_layers, lr_mode, first_order, sweep):
    widths = (3, 12, 10, 4)
    model = mlp(widths, "sigmoid", seed=3)
    maml = pymeta.ModelAwareMAML(
        model,
        inner_steps=3,
        first_order=first_order,
        loss="cross_entropy",
        adapt_layers=adapt_layers,
        lr_mode=lr_mode,
        learn_inner_lr=True,
    )
    randomize_lrs(maml)
    batch = batch_for(widths, "cross_entropy")
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads_of(got, params), grads_of(want, params))


@pytest.mark.parametrize("multi_step_loss", [True, [0.1, 0.0, 0.3, 0.6]])
@pytest.mark.parametrize("first_order", [False, True])
def test_multi_step_loss_matches_autograd_reference(multi_step_loss, first_order, sweep):
    widths = (2, 16, 16, 1)
    model = mlp(widths, "leaky", seed=4)
    maml = pymeta.ModelAwareMAML(
        model,
        inner_steps=4,
        first_order=first_order,
        lr_mode="per_layer_step",
        learn_inner_lr=True,
        multi_step_loss=multi_step_loss,
    )
    randomize_lrs(maml, seed=1)
    batch = batch_for(widths, "mse")
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.mse_loss)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads_of(got, params), grads_of(want, params))


def test_fixed_rates_are_not_parameters_and_learned_ones_are():
    model = mlp((2, 4, 1))
    n = len(list(model.parameters()))
    assert len(list(pymeta.ModelAwareMAML(model).parameters())) == n
    assert len(list(pymeta.ModelAwareMAML(model, learn_inner_lr=True).parameters())) == n + 1
    per = pymeta.ModelAwareMAML(
        model, inner_steps=3, lr_mode="per_layer_step", learn_inner_lr=True, adapt_layers="head"
    )
    assert per.inner_lr.lr.shape == (3, 1)
    meta_sgd = pymeta.ModelAwareMAML(model, learn_inner_lr="per_parameter", inner_lr=0.2)
    assert [lr.shape for lr in meta_sgd.inner_lrs()] == [p.shape for p in model.parameters()]


# ----------------------------------------------------------------------------- the ops
def test_gradcheck_of_the_core_op():
    widths = (2, 5, 3)
    model = mlp(widths, "tanh")
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, loss="cross_entropy", lr_mode="per_layer_step", learn_inner_lr=True
    )
    batch = batch_for(widths, "cross_entropy", tasks=2, k=3, q=2)
    n = len(maml.spec.param_names)

    def f(*tensors):
        args = maml._core_args(
            batch.support_x,
            batch.support_y,
            batch.query_x,
            batch.query_y,
            params=list(tensors[:n]),
            lrs=list(tensors[n:]),
        )
        out = torch.ops.pymeta.net_maml_loss(*args, False, False)
        return out[0]

    inputs = tuple(t.detach().clone().requires_grad_() for t in maml._params() + maml.inner_lrs())
    assert torch.autograd.gradcheck(f, inputs)


def test_meta_gradient_cannot_be_differentiated_again():
    model = mlp((2, 4, 1))
    loss = pymeta.ModelAwareMAML(model).meta_loss(batch_for((2, 4, 1), "mse"))
    with pytest.raises(RuntimeError, match="cannot be differentiated again.*pymeta.MAML"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def test_ops_return_gradients_only_when_asked():
    widths = (2, 4, 1)
    maml = pymeta.ModelAwareMAML(mlp(widths))
    b = batch_for(widths, "mse")
    args = maml._core_args(b.support_x, b.support_y, b.query_x, b.query_y)
    loss, grads, lr_grads, per_task, _ = torch.ops.pymeta.net_maml_loss(*args, False, False)
    assert grads == [] and lr_grads == [] and per_task.shape == (4,)
    torch.testing.assert_close(per_task.mean(), loss.detach())
    _, grads, lr_grads, _, _ = torch.ops.pymeta.net_maml_loss(*args, True, True)
    assert [g.shape for g in grads] == [p.shape for p in maml._params()] and lr_grads[0].shape == ()
    with torch.no_grad():
        assert torch.equal(maml.meta_loss(b), loss.detach())


def test_fake_kernels_trace_with_torch_compile():
    widths = (2, 4, 1)
    maml = pymeta.ModelAwareMAML(mlp(widths))
    b = batch_for(widths, "mse")
    torch.library.opcheck(
        torch.ops.pymeta.net_maml_loss.default,
        (
            *maml._core_args(
                b.support_x,
                b.support_y,
                b.query_x,
                b.query_y,
                params=[p.detach() for p in maml._params()],
            ),
            True,
            True,
        ),
        test_utils=("test_schema", "test_faketensor"),
    )


# ----------------------------------------------------------------------------- adaptation
@pytest.mark.parametrize("lr_mode", ["scalar", "per_parameter"])
def test_adapt_matches_model_agnostic_adapt(lr_mode):
    widths = (1, 40, 40, 1)
    model = mlp(widths)
    aware = pymeta.ModelAwareMAML(model, inner_lr=0.02, inner_steps=2, lr_mode=lr_mode)
    agnostic = pymeta.MAML(model, inner_lr=0.02, inner_steps=2)
    b = batch_for(widths, "mse")
    before = [p.clone() for p in model.parameters()]
    got = aware.adapt(b.support_x, b.support_y, steps=5)(b.query_x)
    want = agnostic.adapt(b.support_x, b.support_y, steps=5)(b.query_x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    one = aware.adapt(b.support_x[2], b.support_y[2])
    torch.testing.assert_close(
        one(b.query_x[2]), agnostic.adapt(b.support_x[2], b.support_y[2])(b.query_x[2])
    )
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_adapt_head_only_leaves_the_body():
    widths = (3, 8, 4)
    maml = pymeta.ModelAwareMAML(
        mlp(widths), adapt_layers="head", loss="cross_entropy", inner_lr=0.5
    )
    b = batch_for(widths, "cross_entropy")
    adapted = maml.adapt(b.support_x, b.support_y)
    body = maml.module[0].weight
    assert torch.equal(adapted.params["0.weight"][1], body)
    assert not torch.equal(adapted.params["2.weight"][1], maml.module[2].weight)


def test_sinusoid_meta_training_learns_to_adapt():
    """A short run: post-adaptation MSE ends well below pre-adaptation MSE."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    before, after = sinusoid_mse_before_after(pymeta.ModelAwareMAML(model, inner_lr=0.01))
    assert after < 0.6 * before, (before, after)


# ----------------------------------------------------------------------------- bad input
class ScaledOutput(nn.Module):
    """A module with its own forward: the graph reader follows it to the unsupported product."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)

    def forward(self, x):
        return self.lin(x) * 2


@pytest.mark.parametrize(
    "model, exc, match",
    [
        (
            nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.Flatten(), nn.Linear(2, 1)),
            ValueError,
            r"model.0 \(Conv2d\): only groups=1 and dilation=1",
        ),
        (
            nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 1)),
            ValueError,
            r"model.1 \(Dropout\): layer type not supported by ModelAwareMAML .* use pymeta.MAML",
        ),
        (
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 1)),
            ValueError,
            r"model.1 \(BatchNorm1d\): .* track_running_stats=False",
        ),
        (
            ScaledOutput(),
            ValueError,
            r"node 'mul' \(call_function mul\) in the forward of model \(ScaledOutput\): not "
            r"supported by ModelAwareMAML.* use pymeta.MAML",
        ),
        (nn.Sequential(nn.Flatten()), ValueError, r"at least one layer with parameters"),
    ],
)
def test_unsupported_models(model, exc, match):
    with pytest.raises(exc, match=match):
        pymeta.ModelAwareMAML(model)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (
            dict(adapt_layers=[1]),
            ValueError,
            r"adapt_layers: model\[1\] has no parameters to adapt; layers with parameters are at "
            r"indices \[0, 2\]",
        ),
        (dict(adapt_layers=[]), ValueError, r"adapt_layers: expected at least one layer"),
        (dict(adapt_layers="body"), TypeError, r"adapt_layers: expected None, 'head' or a list"),
        (dict(lr_mode="per_step"), ValueError, r"lr_mode: expected one of"),
        (dict(learn_inner_lr="per_layer"), ValueError, r"learn_inner_lr: expected a bool"),
        (dict(multi_step_loss=[1.0]), ValueError, r"multi_step_loss: expected 2 finite weights"),
        (dict(multi_step_loss=["a", 1]), TypeError, r"multi_step_loss: expected a bool or a seq"),
        (dict(multi_step_loss=[0.0, 0.0]), ValueError, r"multi_step_loss: expected weights >= 0"),
        (dict(multi_step_loss=[1.0, -0.5]), ValueError, r"multi_step_loss: expected weights >= 0"),
        (dict(loss="hinge"), ValueError, r"loss: expected one of"),
        (dict(inner_steps=0), ValueError, r"inner_steps: expected a positive int"),
        (dict(inner_lr=-1.0), ValueError, r"inner_lr: expected a finite number >= 0"),
    ],
)
def test_bad_options(kwargs, exc, match):
    kwargs.setdefault("inner_steps", 2)
    with pytest.raises(exc, match=match):
        pymeta.ModelAwareMAML(mlp((2, 4, 1)), **kwargs)


def test_bad_data():
    widths = (2, 4, 3)
    maml = pymeta.ModelAwareMAML(
        mlp(widths), loss="cross_entropy", inner_steps=2, lr_mode="per_layer_step"
    )
    b = batch_for(widths, "cross_entropy")
    with pytest.raises(
        ValueError,
        match=r"batch.support_y: expected class indices in \[0, 3\), received values in \[0, 7\]",
    ):
        maml.meta_loss(
            pymeta.TaskBatch(
                b.support_x, b.support_y.clamp(max=0) + 7 * (b.support_y == 2), b.query_x, b.query_y
            )
        )
    with pytest.raises(TypeError, match=r"batch.support_x: expected dtype torch.float64"):
        maml.meta_loss(b.to(dtype=torch.float32))
    with pytest.raises(
        ValueError, match=r"batch.support_x: the model cannot take examples of shape \(1,\)"
    ):
        maml.meta_loss(
            pymeta.TaskBatch(b.support_x[..., :1], b.support_y, b.query_x[..., :1], b.query_y)
        )
    with pytest.raises(TypeError, match=r"batch.support_y: cross_entropy expects int64"):
        maml.meta_loss(pymeta.TaskBatch(b.support_x, b.support_y.int(), b.query_x, b.query_y.int()))
    with pytest.raises(
        ValueError, match=r"steps: per_layer_step rates exist for 2 steps, received 3"
    ):
        maml.adapt(b.support_x, b.support_y, steps=3)
    mse = pymeta.ModelAwareMAML(mlp(widths))
    with pytest.raises(ValueError, match=r"batch.support_y: mse expects targets \(T, K, 3\)"):
        mse.meta_loss(
            pymeta.TaskBatch(b.support_x, b.support_x[..., :1], b.query_x, b.query_x[..., :1])
        )
    with pytest.raises(ValueError, match=r"batch.support_x: expected a tensor on meta"):
        pymeta.ModelAwareMAML(mlp(widths).to("meta")).meta_loss(b)


@pytest.mark.parametrize(
    "widths, loss",
    [
        ((1, 40, 40, 1), "mse"),
        ((64, 256, 256, 10), "cross_entropy"),
        ((5, 24, 17, 3), "cross_entropy"),
        ((9, 8, 33, 2), "mse"),
    ],
)
def test_float32_matches_maml(widths, loss):
    """float32 runs the core's vectorized kernels (AVX2 where the CPU has it): same results as
    pymeta.MAML up to float32 rounding, for column counts that are and are not multiples of 8."""
    model = mlp(widths, "relu").float()
    batch = batch_for(widths, loss, tasks=3, k=25, q=7).to(dtype=torch.float32)
    kwargs = dict(inner_lr=0.05, inner_steps=2, loss=loss)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    params = list(model.parameters())
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for g, w in zip(grads_of(la, params), grads_of(lb, params)):
        assert rel_err(g, w) < 1e-4


# ------------------------------------------------------------------ the MLP fast path
@pytest.fixture
def mlp_fast_path_off():
    """Runs MLPs through the core's layered rules instead of its MLP fast path."""
    _C.set_mlp_fast_path(False)
    yield
    _C.set_mlp_fast_path(True)


@pytest.mark.parametrize("act", ["relu", "leaky", "tanh", "sigmoid"])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_parameter"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_the_mlp_fast_path_equals_the_layered_rules(act, lr_mode, loss):
    """One driver, two ways to run an MLP: the fast path's flat-buffer kernels and the layered
    rules give the same losses, meta-gradients (rates included) and adapted parameters."""
    widths = (3, 5, 4)
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(3, 5), ACTIVATIONS[act](), nn.Linear(5, 4)
    ).double()  # fmt: skip
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=3, loss=loss, lr_mode=lr_mode, learn_inner_lr=True,
        multi_step_loss=True, adapt_layers="head" if lr_mode == "scalar" else None,
    )  # fmt: skip
    randomize_lrs(maml, seed=4)
    b = batch_for(widths, loss)
    params = list(maml.parameters())
    results = {}
    for path in ("mlp", "layered"):
        _C.set_mlp_fast_path(path == "mlp")
        try:
            assert maml.core_kind == path
            loss_value = maml.meta_loss(b)
            grads = torch.autograd.grad(loss_value, params)
            adapted = maml.adapt(b.support_x, b.support_y)(b.query_x)
        finally:
            _C.set_mlp_fast_path(True)
        results[path] = (loss_value, grads, adapted)
    (la, ga, aa), (lb, gb, ab) = results["mlp"], results["layered"]
    assert rel_err(la, lb) < 1e-12 and rel_err(aa, ab) < 1e-12
    for x, y in zip(ga, gb):
        assert rel_err(x, y) < 1e-11


@pytest.mark.parametrize(
    "layers, fast",
    [
        ([nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)], True),
        ([nn.Flatten(), nn.Linear(3, 4), nn.Linear(4, 2)], True),
        ([nn.Linear(3, 4), nn.Tanh(), nn.ReLU(), nn.Linear(4, 2)], False),  # two activations
        ([nn.Tanh(), nn.Linear(3, 4)], False),  # an activation before any Linear
        ([nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2)], False),
        ([nn.Linear(3, 4), nn.Flatten(), nn.Linear(4, 2)], False),  # a Flatten inside
    ],
)
def test_which_networks_take_the_mlp_fast_path(layers, fast):
    maml = pymeta.ModelAwareMAML(nn.Sequential(*layers))
    assert maml.core_kind == ("mlp" if fast else "layered")


def test_mlp_fast_path_switch(mlp_fast_path_off):
    maml = pymeta.ModelAwareMAML(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    assert not _C.mlp_fast_path() and maml.core_kind == "layered"
