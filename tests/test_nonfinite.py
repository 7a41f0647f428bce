"""NaN and ±inf propagate through the model-aware core exactly as through PyTorch: the loss and
every meta-gradient have NaN and ±inf in the same elements as pymeta.MAML and a plain per-task
autograd loop. Both cores (the MLP kernels and the layered kernels), every CPU fast path,
every activation, first and second order, the learning-rate and adaptation options, adapt().

A regression guard for ReLU written as ``a > 0 ? a : 0``, which maps NaN to 0: the MLP kernels
then returned a finite loss and finite gradients for a network whose own forward gives NaN.
"""

import types

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, randomize_lrs, reference_loss, reference_meta_loss
from torch import nn

import pymeta
from pymeta import _C

NAN, INF = float("nan"), float("inf")
BAD = [NAN, INF, -INF]
LOSS_FNS = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}
ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def nonfinite_pattern(t: torch.Tensor):
    return t.isnan(), t.isposinf(), t.isneginf()


def assert_same_nonfinite(got, want, what=""):
    """Same NaN, +inf and -inf elements in each pair of tensors (all may be finite: a -inf bias
    before ReLU only silences a unit)."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        for a, b, kind in zip(nonfinite_pattern(g), nonfinite_pattern(w), ("NaN", "+inf", "-inf")):
            assert torch.equal(a, b), f"{what} output {i}: {kind} at {a.sum()}, want {b.sum()}"


def mlp(widths, act, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).to(dtype)


def data(example, out, loss, dtype, tasks=3, k=5, q=4, seed=1):
    """(support_x, support_y, query_x, query_y) as plain tensors: the in-place edits below put
    NaN in them after TaskBatch's own finiteness check."""
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, *example, generator=g).to(dtype)  # noqa: E731
    if loss == "mse":
        y = lambda n: torch.randn(tasks, n, out, generator=g).to(dtype)  # noqa: E731
    else:
        y = lambda n: torch.randint(0, out, (tasks, n), generator=g)  # noqa: E731
    return x(k), y(k), x(q), y(q)


def poison(model, where, bad):
    """Writes `bad` into one element of the first layer's weight or bias, or a hidden layer's."""
    layers = [m for m in model if hasattr(m, "weight") and m.weight is not None]
    layer = layers[{"weight": 0, "bias": 0, "hidden weight": 1, "head bias": -1}[where]]
    with torch.no_grad():
        if where.endswith("bias"):
            layer.bias.view(-1)[1] = bad
        else:
            layer.weight.view(-1)[1] = bad


def meta_results(learner, batch, params):
    loss = learner.meta_loss(batch)
    return [loss, *torch.autograd.grad(loss, params)]


def reference_results(model, batch, lr, steps, first_order, loss):
    params = list(model.parameters())
    ref = reference_meta_loss(model, batch, [lr], steps, first_order, LOSS_FNS[loss])
    return [ref, *torch.autograd.grad(ref, params)]


# ----------------------------------------------------------------------------- the MLP core
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mlp_core_propagates_a_bad_parameter_like_maml(act, first_order, loss):
    # csrc/cpu/small_gemm.h: the small net takes the plain loops; the wide one, with 12 rows,
    # the AVX2 products in float32 and BLAS in float64.
    small, wide = (3, 8, 6, 4), (20, 40, 48, 8)
    for dtype, widths in ((torch.float64, small), (torch.float32, wide), (torch.float64, wide)):
        for where in ("weight", "bias", "hidden weight", "head bias"):
            for bad in BAD:
                model = mlp(widths, act, dtype)
                poison(model, where, bad)
                batch = pymeta.TaskBatch(*data(widths[:1], widths[-1], loss, dtype, k=12))
                kw = dict(inner_lr=0.1, inner_steps=2, first_order=first_order, loss=loss)
                params = list(model.parameters())
                got = meta_results(pymeta.ModelAwareMAML(model, **kw), batch, params)
                agnostic = meta_results(pymeta.MAML(model, **kw), batch, params)
                lr = torch.tensor(0.1, dtype=dtype)
                want = reference_results(model, batch, lr, 2, first_order, loss)
                what = f"{dtype} {where}={bad}"
                assert_same_nonfinite(agnostic, want, f"pymeta.MAML {what}")
                assert_same_nonfinite(got, want, f"ModelAwareMAML {what}")


def test_a_nan_weight_through_relu_is_not_hidden():
    """The defect as reported: relu(NaN) must stay NaN, so the loss and every gradient are NaN
    (the kernels gave a finite loss and finite gradients)."""
    model = mlp((1, 40, 40, 1), "relu")
    poison(model, "weight", NAN)
    batch = pymeta.TaskBatch(*data((1,), 1, "mse", torch.float64))
    params = list(model.parameters())
    results = meta_results(pymeta.ModelAwareMAML(model, inner_lr=0.01), batch, params)
    assert all(r.isnan().any() for r in results)
    assert model(batch.query_x).isnan().all()


def assert_raw_op_like_autograd(model, data_, first_order, loss, what):
    """The core's loss op (TaskBatch would refuse non-finite data; the op takes it) against the
    autograd loop, 2 inner steps at 0.1. data_: (support_x, support_y, query_x, query_y)."""
    maml = pymeta.ModelAwareMAML(
        model, inner_lr=0.1, inner_steps=2, first_order=first_order, loss=loss
    )
    sx, sy, qx, qy = data_
    got, grads, _, _, _ = maml._loss_op(*maml._core_args(sx, sy, qx, qy), True, False)
    batch = types.SimpleNamespace(
        support_x=sx, support_y=sy, query_x=qx, query_y=qy, num_tasks=sx.shape[0]
    )
    lr = torch.tensor(0.1, dtype=torch.float64)
    want = reference_results(model, batch, lr, 2, first_order, loss)
    assert_same_nonfinite([got, *grads], want, what)


@pytest.mark.parametrize("act", ["relu", "leaky", "tanh"])
@pytest.mark.parametrize("first_order", [False, True])
def test_mlp_core_propagates_a_bad_input_like_autograd(act, first_order):
    """NaN or ±inf in one support or query input (TaskBatch refuses them; the raw op takes
    them), against the autograd loop."""
    widths = (3, 8, 6, 4)
    for where in ("support_x", "query_x"):
        for bad in BAD:
            model = mlp(widths, act)
            sx, sy, qx, qy = data(widths[:1], widths[-1], "mse", torch.float64)
            {"support_x": sx, "query_x": qx}[where][1, 2, 0] = bad
            assert_raw_op_like_autograd(
                model, (sx, sy, qx, qy), first_order, "mse", f"{where}={bad}"
            )


OPTIONS = {
    "anil": dict(adapt_layers="head"),
    "frozen middle": dict(adapt_layers=[0, 4]),
    "maml++ rates": dict(lr_mode="per_layer_step", learn_inner_lr=True),
    "meta-sgd": dict(learn_inner_lr="per_parameter"),
    "zero step weight": dict(learn_inner_lr="scalar", multi_step_loss=[0.0, 1.0]),
    "multi-step": dict(multi_step_loss=True),
}


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("sweep", ["cached", "recomputed"])
def test_mlp_core_options_propagate_like_autograd(option, sweep):
    """Frozen layers, learned rates (their gradients too), multi-step losses with a zero weight,
    with the inner loop's activations kept or recomputed by the reverse sweep."""
    widths = (3, 8, 6, 4)
    default = _C.activation_cache_limit()
    _C.set_activation_cache_limit(0 if sweep == "recomputed" else default)
    try:
        for act, where, bad, first_order in (
            ("relu", "weight", NAN, False),
            ("relu", "hidden weight", -INF, False),
            ("relu", "head bias", INF, True),
            ("leaky", "bias", NAN, False),
            ("sigmoid", "hidden weight", INF, False),
        ):
            model = mlp(widths, act)
            poison(model, where, bad)
            maml = pymeta.ModelAwareMAML(
                model, inner_lr=0.1, inner_steps=2, first_order=first_order, loss="cross_entropy",
                **OPTIONS[option],
            )  # fmt: skip
            randomize_lrs(maml)
            batch = pymeta.TaskBatch(*data(widths[:1], widths[-1], "cross_entropy", torch.float64))
            params = list(model.parameters()) + [lr for lr in maml.inner_lrs() if lr.requires_grad]
            got = meta_results(maml, batch, params)
            ref = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
            grads = torch.autograd.grad(ref, params, allow_unused=True)
            want = [ref, *(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))]
            assert_same_nonfinite(got, want, f"{act} {where}={bad}")
    finally:
        _C.set_activation_cache_limit(default)


# ----------------------------------------------------------------------------- the layered core
def conv_net(name, dtype):
    """(model, example shape). "bn": conv4's block, where the fused batch norm + ReLU + pooling
    and batch-norm tangent kernels run; "pool": no batch norm, so NaN reaches only some max
    pooling windows (ATen's max_pool2d keeps it); "smooth": LeakyReLU, Tanh, Sigmoid, average
    pooling and BatchNorm1d; "wide": an 80-channel 3x3 convolution, which the Winograd path
    takes, without batch norm (NaN and inf stay where the convolution spreads them)."""
    torch.manual_seed(0)
    bn2 = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731
    if name == "bn":
        layers = [
            nn.Conv2d(1, 3, 3, padding=1), bn2(3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 3, 3, padding=1), bn2(3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(12, 3),
        ]  # fmt: skip
        example = (1, 8, 8)
    elif name == "pool":
        layers = [
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8, 3),
        ]  # fmt: skip
        example = (1, 8, 8)
    elif name == "wide":
        layers = [
            nn.Conv2d(1, 80, 3, padding=1), nn.ReLU(),
            nn.Conv2d(80, 80, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(720, 3),
        ]  # fmt: skip
        example = (1, 6, 6)
    else:
        layers = [
            nn.Conv2d(2, 3, 3), bn2(3), nn.LeakyReLU(0.2), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(12, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Tanh(),
            nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3),
        ]  # fmt: skip
        example = (2, 6, 6)
    return nn.Sequential(*layers).to(dtype), example


FAST_PATHS = {"all": (True, True, True, True), "none": (False, False, False, False),
              "fused only": (False, True, False, False),
              "channels-last only": (True, False, False, False),
              "gemm weight grads only": (False, False, True, False),
              "channels-last and winograd": (True, False, False, True),
              "channels-last and winograd 4x4": (True, False, False, True)}  # fmt: skip


@pytest.fixture(params=list(FAST_PATHS))
def fast_paths(request):
    """The layered core's CPU fast paths (channels-last, fused kernels, matrix-product weight
    gradients, Winograd convolutions): all, none, and each on its own (Winograd needs the
    channels-last layout); "4x4" forces F(4x4, 3x3) on every 3x3 convolution Winograd's path
    can take, whatever its channels and batch."""
    default = _C.cpu_fast_paths(), _C.winograd_blocks()
    _C.set_cpu_fast_paths(*FAST_PATHS[request.param])
    _C.set_winograd_blocks(4 if request.param.endswith("4x4") else 0)
    yield request.param
    _C.set_cpu_fast_paths(*default[0])
    _C.set_winograd_blocks(default[1])


@pytest.mark.parametrize("name", ["bn", "pool", "smooth", "wide"])
@pytest.mark.parametrize("first_order", [False, True])
def test_layered_core_propagates_a_bad_parameter_like_maml(name, first_order, fast_paths):
    float32 = fast_paths in ("all", "none")  # float32's own vectorised loops, not each mix
    for dtype in (torch.float64, torch.float32) if float32 else (torch.float64,):
        for where in ("weight", "bias", "hidden weight"):
            for bad in BAD:
                model, example = conv_net(name, dtype)
                poison(model, where, bad)
                batch = pymeta.TaskBatch(*data(example, 3, "cross_entropy", dtype, tasks=2))
                kw = dict(inner_lr=0.1, inner_steps=2, first_order=first_order,
                          loss="cross_entropy")  # fmt: skip
                params = list(model.parameters())
                got = meta_results(pymeta.ModelAwareMAML(model, **kw), batch, params)
                want = reference_results(model, batch, torch.tensor(0.1, dtype=dtype), 2,
                                         first_order, "cross_entropy")  # fmt: skip
                what = f"{dtype} {where}={bad}"
                assert_same_nonfinite(meta_results(pymeta.MAML(model, **kw), batch, params), want,
                                      f"pymeta.MAML {what}")  # fmt: skip
                assert_same_nonfinite(got, want, f"ModelAwareMAML {what}")


@pytest.mark.parametrize("name", ["bn", "pool", "wide"])
@pytest.mark.parametrize("first_order", [False, True])
def test_layered_core_propagates_a_bad_pixel_like_autograd(name, first_order, fast_paths):
    """One NaN or ±inf pixel: through batch norm it spoils the whole channel; without, only the
    pooling windows that the convolution spreads it to."""
    for where in ("support_x", "query_x"):
        for bad in BAD:
            model, example = conv_net(name, torch.float64)
            sx, sy, qx, qy = data(example, 3, "cross_entropy", torch.float64, tasks=2)
            {"support_x": sx, "query_x": qx}[where][1, 0, 0, 3, 4] = bad
            assert_raw_op_like_autograd(
                model, (sx, sy, qx, qy), first_order, "cross_entropy", f"{where}={bad}"
            )


# ----------------------------------------------------------------------------- adapt()
def assert_adapt_like_maml(model, example, act, where, bad):
    poison(model, where, bad)
    sx, sy, qx, _ = data(example, 3, "cross_entropy", torch.float64, tasks=2)
    kw = dict(inner_lr=0.1, loss="cross_entropy")
    got = pymeta.ModelAwareMAML(model, **kw).adapt(sx, sy, steps=2)(qx)
    want = pymeta.MAML(model, **kw).adapt(sx, sy, steps=2)(qx)
    assert_same_nonfinite([got], [want], f"{act} {where}={bad}")


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_net_adapt_propagates_a_bad_parameter_like_maml(act):
    for where in ("weight", "hidden weight", "head bias"):
        for bad in BAD:
            assert_adapt_like_maml(mlp((3, 8, 6, 3), act), (3,), act, where, bad)


@pytest.mark.parametrize("name", ["bn", "pool"])
def test_layered_adapt_propagates_a_bad_parameter_like_maml(name, fast_paths):
    for where in ("weight", "hidden weight", "head bias"):
        for bad in BAD:
            assert_adapt_like_maml(*conv_net(name, torch.float64), "relu", where, bad)
