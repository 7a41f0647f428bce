"""pymeta.ModelAwareMAML on convolutional networks (the core's layered kernels): float64 parity
with pymeta.MAML and with a plain autograd reference, per-step batch norm (MAML++), the op's
gradients, adaptation, threads, float32, learning, and bad input."""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, randomize_lrs, reference_loss, rel_err
from torch import nn

import pymeta
from pymeta.evaluation import few_shot_accuracy

TOL = 1e-10


def bn(channels, affine=True, dims=2):
    kind = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return kind(channels, affine=affine, track_running_stats=False)


def with_head(body, example_shape, n_out, *tail):
    """body + Flatten + Linear(features, n_out) + tail, sized by running the body once."""
    with torch.no_grad():
        features = body(torch.zeros(2, *example_shape)).flatten(1).shape[1]
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(features, n_out), *tail)


def conv_net(name, seed=0):
    """(model, example shape): small networks covering every layered-core rule."""
    torch.manual_seed(seed)
    if name == "conv-bn-relu-maxpool":  # conv4's block, twice
        body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=1), bn(4), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        return with_head(body, (1, 8, 8), 3).double(), (1, 8, 8)
    if name == "odd-sizes":  # the fused batch norm + ReLU + 2x2 max pooling block (query sets,
        # first-order and adapt-only passes) at odd sizes, where a row and a column fall in no
        # pooling window, with and without affine batch norm
        body = nn.Sequential(  # 9 x 7 -> 4 x 3 -> 2 x 1
            nn.Conv2d(1, 3, 3, padding=1), bn(3, affine=False), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        return with_head(body, (1, 9, 7), 3).double(), (1, 9, 7)
    if name == "strided-avgpool-smooth":  # strides, asymmetric kernels and padding, no bias,
        # batch norm without affine, smooth activations, avg pooling both ways, BatchNorm1d
        body = nn.Sequential(
            nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), bias=False), bn(3, False),
            nn.LeakyReLU(0.2), nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
            nn.Conv2d(3, 4, 1), nn.Tanh(), nn.AvgPool2d(2), nn.MaxPool2d(2, stride=1, padding=1),
        )  # fmt: skip
        model = with_head(body, (2, 9, 7), 5, bn(5, dims=1), nn.Sigmoid(), nn.Linear(5, 3))
        return model.double(), (2, 9, 7)
    raise KeyError(name)


NETS = ["conv-bn-relu-maxpool", "odd-sizes", "strided-avgpool-smooth"]


def batch_for(example, loss, tasks=3, k=4, q=5, classes=3, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, *example, generator=g, dtype=dtype)  # noqa: E731
    if loss == "mse":
        y = lambda n: torch.randn(tasks, n, classes, generator=g, dtype=dtype)  # noqa: E731
    else:
        y = lambda n: torch.randint(0, classes, (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def grads_of(loss, params):
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def assert_close_grads(got, want):
    # Relative to the largest gradient: a conv bias before batch norm has an exact-zero
    # gradient, which both sides get only up to rounding.
    scale = max(float(w.abs().max()) for w in want)
    err = max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale
    assert err < TOL, err


# ----------------------------------------------------------------------------- parity with MAML
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_equals_model_agnostic_maml(net, steps, first_order, loss):
    model, example = conv_net(net)
    kwargs = dict(inner_lr=0.3, inner_steps=steps, first_order=first_order, loss=loss)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    assert aware.core_kind == "layered"
    batch = batch_for(example, loss)
    params = list(model.parameters())
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(grads_of(la, params), grads_of(lb, params))


@pytest.mark.parametrize(
    "paths",
    [
        (True, False, True, True),
        (True, True, False, True),
        (True, True, True, False),
        (False, False, False, False),
    ],
    ids=["channels-last", "onednn-weight-grads", "no-winograd", "aten"],
)
@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("first_order", [False, True])
def test_without_the_cpu_fast_paths(paths, net, first_order):
    # The same parity with the fused kernels off (channels-last ATen ops), with every weight
    # gradient from oneDNN (no matrix-product path), with every convolution in oneDNN (no
    # Winograd), and with all CPU fast paths off (ATen ops in the default layout: the rules the
    # core runs on CUDA).
    saved = pymeta._C.cpu_fast_paths()
    pymeta._C.set_cpu_fast_paths(*paths)
    try:
        assert pymeta._C.cpu_fast_paths() == paths
        model, example = conv_net(net)
        kwargs = dict(inner_lr=0.3, inner_steps=2, first_order=first_order, loss="cross_entropy")
        aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
        batch = batch_for(example, "cross_entropy")
        params = list(model.parameters())
        la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
        assert rel_err(la, lb) < TOL
        assert_close_grads(grads_of(la, params), grads_of(lb, params))
    finally:
        pymeta._C.set_cpu_fast_paths(*saved)


def grads_with_each_paths(model, example, steps, first_order, paths_list, count_op=None):
    """ModelAwareMAML's meta-gradients (2 tasks) under each CPU fast-path setting in paths_list,
    each checked against pymeta.MAML; returns (params, [grads per setting]), and with count_op
    (an ATen op name, e.g. "aten::bmm") also [calls of it per setting] (torch.profiler)."""
    kwargs = dict(inner_lr=0.3, inner_steps=steps, first_order=first_order, loss="cross_entropy")
    batch = batch_for(example, "cross_entropy", tasks=2)
    params = list(model.parameters())
    agnostic = pymeta.MAML(model, **kwargs).meta_loss(batch)
    want = grads_of(agnostic, params)
    saved, runs, calls = pymeta._C.cpu_fast_paths(), [], []
    try:
        for paths in paths_list:
            pymeta._C.set_cpu_fast_paths(*paths)
            cpu = [torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=cpu) if count_op else nullcontext() as prof:
                loss = pymeta.ModelAwareMAML(model, **kwargs).meta_loss(batch)
                runs.append(grads_of(loss, params))
            if count_op:
                calls.append(sum(e.count for e in prof.key_averages() if e.key == count_op))
            assert rel_err(loss, agnostic) < TOL
            assert_close_grads(runs[-1], want)
    finally:
        pymeta._C.set_cpu_fast_paths(*saved)
    return (params, runs) if count_op is None else (params, runs, calls)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_deep_small_convolutions_take_the_matrix_product_weight_gradients(steps, first_order):
    # 80 channels on 4x4 maps: every weight gradient after the first convolution takes the
    # matrix-product path (net/layers.cpp, weight_grad_by_gemm), in the inner steps, the query
    # passes and the Hessian-vector products. Exact with the path and without it; the path's
    # batched matrix products (aten::bmm in float64) show that it ran: the two can agree to the
    # last bit where BLAS and ATen's direct convolution add in the same order (they do here in
    # first order on an AMD Zen 5 with MKL).
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, 80, 3, padding=1), bn(80), nn.LeakyReLU(0.1),
        nn.Conv2d(80, 80, 3, padding=1, bias=False), bn(80), nn.ReLU(),
    )  # fmt: skip
    model = with_head(body, (2, 4, 4), 3).double()
    paths = [(True, True, gemm, False) for gemm in (True, False)]
    params, _, bmm_calls = grads_with_each_paths(
        model, (2, 4, 4), steps, first_order, paths, count_op="aten::bmm"
    )
    conv2_weight = 4  # after conv1 (w, b) and bn (w, b)
    assert params[conv2_weight].shape == (80, 80, 3, 3)
    # The head's products are bmm calls in both runs; the path adds one per weight gradient.
    assert bmm_calls[0] > bmm_calls[1], bmm_calls


class WideResidualBlock(nn.Module):
    """Two 3x3 convolutions of `width` channels (80 by default) with a residual add (the
    torchvision way)."""

    def __init__(self, channels, width=80):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), bn(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), bn(width),
        )  # fmt: skip
        self.shortcut = nn.Conv2d(channels, width, 1)

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize(("width", "size", "block"), [(80, 5, 2), (32, 16, 4)], ids=["2x2", "4x4"])
def test_3x3_convolutions_take_winograd(steps, first_order, width, size, block):
    # The block's two 3x3 convolutions run by Winograd (cpu/winograd.h, winograd_block_by_shape)
    # in the inner steps, the query passes and the Hessian-vector products: F(2x2, 3x3) at 80
    # channels on 5x5 maps (an odd size: partial tiles), F(4x4, 3x3) at 32 channels on 16x16 maps
    # (4 support and 5 query images per task: 64 and 80 of its blocks). Exact with the path and
    # without it, and the two differ in the last bits, which shows that the path ran.
    for n in (4, 5):
        assert pymeta._C.winograd_block_by_shape(n, width, width, size, size) == block
    torch.manual_seed(0)
    body = nn.Sequential(
        nn.Conv2d(2, width, 3, padding=1), WideResidualBlock(width, width), nn.MaxPool2d(2)
    )
    model = with_head(body, (2, size, size), 3).double()
    paths = [(True, True, True, winograd) for winograd in (True, False)]
    params, runs = grads_with_each_paths(model, (2, size, size), steps, first_order, paths)
    wide = [i for i, p in enumerate(params) if p.shape == (width, width, 3, 3)]
    assert len(wide) == 2  # the block's two convolutions
    for i in wide:
        assert not torch.equal(runs[0][i], runs[1][i])


def test_conv4_equals_model_agnostic_maml():
    torch.manual_seed(0)
    model = pymeta.models.conv4(3, hidden=6, image_size=16).double()
    kwargs = dict(inner_lr=0.4, inner_steps=2, loss="cross_entropy", learn_inner_lr=True)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    batch = batch_for((1, 16, 16), "cross_entropy", tasks=2, k=3, q=6)
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(
        grads_of(la, list(aware.parameters())), grads_of(lb, list(agnostic.parameters()))
    )


def test_mlp_layers_the_fused_core_refuses_run_layered():
    """Two activations in a row are no MLP for the fused kernels, but the layered ones run them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Tanh(), nn.Linear(6, 2)).double()
    aware, agnostic = pymeta.ModelAwareMAML(model), pymeta.MAML(model)
    assert aware.core_kind == "layered"
    batch = batch_for((3,), "mse", classes=2)
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(
        grads_of(la, list(model.parameters())), grads_of(lb, list(model.parameters()))
    )


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("adapt_layers", [None, "head", [0], [1, -1]])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_options_match_autograd_reference(adapt_layers, lr_mode, first_order):
    model, example = conv_net("conv-bn-relu-maxpool", seed=2)
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, first_order=first_order, loss="cross_entropy",
        adapt_layers=adapt_layers, lr_mode=lr_mode, learn_inner_lr=True,
    )  # fmt: skip
    randomize_lrs(maml, low=0.05, width=0.3)
    batch = batch_for(example, "cross_entropy")
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads_of(got, params), grads_of(want, params))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("net", NETS)
def test_per_step_batch_norm_matches_autograd_reference(first_order, net):
    check_per_step_batch_norm(*conv_net(net, seed=3), first_order)


def check_per_step_batch_norm(model, example, first_order):
    """Per-step batch norm weights (distinct rows), learned per-step rates and a multi-step loss
    against the autograd reference; every per-step row gets a gradient."""
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=3, first_order=first_order, loss="cross_entropy",
        lr_mode="per_layer_step", learn_inner_lr=True, multi_step_loss=True, per_step_bn=True,
    )  # fmt: skip
    randomize_lrs(maml, seed=1, low=0.05, width=0.3)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # distinct rows, so a wrong row would show
        for p in maml.bn_steps:
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = batch_for(example, "cross_entropy")
    params = list(maml.parameters())
    got = maml.meta_loss(batch)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    grads = grads_of(got, params)
    assert_close_grads(grads, grads_of(want, params))
    assert all(float(gr.abs().max()) > 0 for gr in grads[-len(maml.bn_steps) :])


def test_per_step_batch_norm_parameters():
    model, _ = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, inner_steps=2, per_step_bn=True)
    shapes = [tuple(p.shape) for p in maml.bn_steps]
    assert shapes == [(3, 4)] * 4  # weight and bias of two BatchNorm2d(4), steps + 1 rows
    assert torch.equal(maml.bn_steps[0][2], model[1].weight.detach())
    assert maml.adapted == [True, False, True, False, True]  # conv, bn, conv, bn, head
    with pytest.raises(ValueError, match=r"adapt_layers: model\[1\] is a batch norm layer with"):
        pymeta.ModelAwareMAML(model, per_step_bn=True, adapt_layers=[1])


# ----------------------------------------------------------------------------- the op
def test_gradcheck_of_the_layered_op():
    model, example = conv_net("strided-avgpool-smooth", seed=4)
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=2, loss="cross_entropy", lr_mode="per_layer_step", learn_inner_lr=True
    )
    batch = batch_for(example, "cross_entropy", tasks=2, k=3, q=2)
    n = len(maml.spec.param_names)

    def f(*tensors):
        args = maml._core_args(
            batch.support_x, batch.support_y, batch.query_x, batch.query_y,
            params=list(tensors[:n]), lrs=list(tensors[n:]),
        )  # fmt: skip
        return torch.ops.pymeta.net_maml_loss(*args, False, False)[0]

    inputs = tuple(t.detach().clone().requires_grad_() for t in maml._params() + maml.inner_lrs())
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6)


def test_layered_op_schema_and_fake_kernel():
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for(example, "cross_entropy")
    args = maml._core_args(b.support_x, b.support_y, b.query_x, b.query_y)
    torch.library.opcheck(torch.ops.pymeta.net_maml_loss.default, (*args, True, False))
    loss = maml.meta_loss(b)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def test_two_threads_give_the_same_meta_gradient():
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, inner_steps=2, loss="cross_entropy")
    batch = batch_for(example, "cross_entropy", tasks=5)
    params = list(model.parameters())
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            loss = maml.meta_loss(batch)
            results.append((loss.detach(), grads_of(loss, params)))
    finally:
        torch.set_num_threads(threads)
    assert rel_err(results[0][0], results[1][0]) < TOL
    assert_close_grads(results[1][1], results[0][1])


def test_float32_matches_model_agnostic_maml():
    model, example = conv_net("conv-bn-relu-maxpool")
    model = model.float()
    kwargs = dict(inner_lr=0.3, loss="cross_entropy")
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    batch = batch_for(example, "cross_entropy", dtype=torch.float32)
    params = list(model.parameters())
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < 1e-5
    got, want = grads_of(la, params), grads_of(lb, params)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) < 1e-4 * scale


def test_meta_loss_under_no_grad_computes_no_gradients():
    # Evaluation under torch.no_grad() gets the same loss without the query sets' backward
    # passes and the reverse sweep; the inner loop still differentiates the support loss.
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, inner_lr=0.3, loss="cross_entropy", first_order=True)
    batch = batch_for(example, "cross_entropy")

    def conv_backwards(fn):
        with torch.profiler.profile() as prof:
            loss = fn()
        calls = sum(e.count for e in prof.key_averages() if e.key == "aten::convolution_backward")
        return loss, calls

    with_grad, calls_with = conv_backwards(lambda: maml.meta_loss(batch))
    with torch.no_grad():
        without, calls_without = conv_backwards(lambda: maml.meta_loss(batch))
    assert rel_err(without, with_grad.detach()) < TOL
    # One inner step: each task's support backward runs through both convolutions either way;
    # the query backward only with gradients.
    assert calls_without == 2 * batch.num_tasks
    assert calls_with == 4 * batch.num_tasks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_parameter_propagates_like_model_agnostic_maml(bad):
    # The fused batch norm + ReLU + pooling kernel tests no element for NaN: a non-finite value
    # must still reach the loss and every gradient, as it does through pymeta.MAML.
    model, example = conv_net("odd-sizes")
    with torch.no_grad():
        model[0].bias[1] = bad
    batch = batch_for(example, "cross_entropy")
    params = list(model.parameters())
    for maml in (
        pymeta.ModelAwareMAML(model, loss="cross_entropy"),
        pymeta.MAML(model, loss="cross_entropy"),
    ):
        loss = maml.meta_loss(batch)
        assert loss.isnan()
        assert all(g.isnan().any() for g in grads_of(loss, params))


# ----------------------------------------------------------------------------- adaptation
def test_adapt_matches_model_agnostic_adapt():
    model, example = conv_net("conv-bn-relu-maxpool")
    kwargs = dict(inner_lr=0.2, inner_steps=3, loss="cross_entropy")
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    b = batch_for(example, "cross_entropy")
    for steps in (1, 3):
        got = aware.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        want = agnostic.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    one = aware.adapt(b.support_x[0], b.support_y[0])  # a single task, no task dimension
    torch.testing.assert_close(
        one(b.query_x[0]), aware.adapt(b.support_x, b.support_y)(b.query_x)[0]
    )


def test_adapt_with_fresh_per_step_batch_norm_equals_frozen_batch_norm():
    """Per-step rows start as the module's weights and are not adapted: the same predictions
    as shared batch norm weights left out of the adaptation."""
    model, example = conv_net("conv-bn-relu-maxpool")
    kwargs = dict(inner_lr=0.2, inner_steps=3, loss="cross_entropy")
    per_step = pymeta.ModelAwareMAML(model, per_step_bn=True, **kwargs)
    frozen = pymeta.ModelAwareMAML(model, adapt_layers=[0, 4, 9], **kwargs)
    b = batch_for(example, "cross_entropy")
    for steps in (1, 3):
        got = per_step.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        want = frozen.adapt(b.support_x, b.support_y, steps=steps)(b.query_x)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_adapt_uses_the_last_steps_batch_norm_row():
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, inner_steps=2, loss="cross_entropy", per_step_bn=True)
    b = batch_for(example, "cross_entropy")
    before = maml.adapt(b.support_x, b.support_y, steps=1)(b.query_x)
    with torch.no_grad():
        maml.bn_steps[0][2].mul_(3.0)  # row 2: only the query after 2 steps uses it
    assert torch.equal(maml.adapt(b.support_x, b.support_y, steps=1)(b.query_x), before)
    assert not torch.equal(maml.adapt(b.support_x, b.support_y, steps=2)(b.query_x), before)


def test_conv4_meta_training_learns_few_shot_classes():
    """Tasks: 3 classes, each a fixed random 12x12 pattern plus noise, relabelled per task.
    After a few dozen meta-steps, one adaptation step gives far better than chance."""
    torch.manual_seed(0)
    patterns = torch.randn(40, 1, 12, 12)
    examples = patterns[:, None] + 0.8 * torch.randn(40, 10, 1, 12, 12)
    tasks = pymeta.tasks.FewShot(examples, n_way=3, k_shot=1, k_query=5)
    model = pymeta.models.conv4(3, hidden=8, image_size=16)
    model[0] = nn.Conv2d(1, 8, 3, padding=1)
    model = nn.Sequential(*list(model)[:-1][:12], nn.Flatten(), nn.Linear(8, 3))
    maml = pymeta.ModelAwareMAML(model, inner_lr=0.4, loss="cross_entropy")
    opt = torch.optim.Adam(maml.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(60):
        opt.zero_grad()
        maml.meta_loss(tasks.sample(8, g)).backward()
        opt.step()
    acc, _ = few_shot_accuracy(maml, tasks, 60, seed=3)
    assert acc > 0.6, acc


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument():
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for(example, "cross_entropy")
    wrong_channels = pymeta.TaskBatch(
        b.support_x.repeat(1, 1, 2, 1, 1), b.support_y, b.query_x.repeat(1, 1, 2, 1, 1), b.query_y
    )
    with pytest.raises(ValueError, match=r"support_x: the model cannot take examples of shape"):
        maml.meta_loss(wrong_channels)
    with pytest.raises(TypeError, match=r"expected dtype torch.float64"):
        maml.meta_loss(batch_for(example, "cross_entropy", dtype=torch.float32))
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        maml.meta_loss(batch_for(example, "cross_entropy", classes=4))
    mse = pymeta.ModelAwareMAML(model, loss="mse")
    with pytest.raises(ValueError, match=r"mse expects targets \(T, K, 3\)"):
        mse.meta_loss(batch_for(example, "mse", classes=2))
    with pytest.raises(ValueError, match=r"per_step_bn: the model has no affine BatchNorm"):
        pymeta.ModelAwareMAML(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), per_step_bn=True)
    with pytest.raises(ValueError, match=r"ceil_mode=True is not supported"):
        pymeta.ModelAwareMAML(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Linear(2, 1)))


@pytest.mark.parametrize("bad", [-100, -1, 3])
@pytest.mark.parametrize("where", ["support_y", "query_y"])
def test_the_raw_op_refuses_classes_outside_the_outputs(bad, where):
    # The Python API refuses them first; the op itself must not index out of bounds or name
    # nothing (before: ATen's "index -100 is out of bounds for dimension 1").
    model, example = conv_net("conv-bn-relu-maxpool")
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for(example, "cross_entropy")
    parts = dict(support_y=b.support_y.clone(), query_y=b.query_y.clone())
    parts[where][0, 0] = bad
    args = maml._core_args(b.support_x, parts["support_y"], b.query_x, parts["query_y"])
    match = "expected class indices >= 0" if bad < 0 else r"expected classes in \[0, 3\)"
    with pytest.raises(ValueError, match=match):
        torch.ops.pymeta.net_maml_loss(*args, True, False)
    if where == "support_y":
        with pytest.raises(ValueError, match=match):
            torch.ops.pymeta.net_adapt(
                maml._params(), maml.inner_lrs(), b.support_x, parts["support_y"],
                maml._layer_codes, maml._layer_args, 1, 0, 1,
            )  # fmt: skip


def test_batch_norm_over_one_value_per_channel_is_refused_like_pytorch():
    # One support example through BatchNorm1d has no batch statistics; PyTorch (and so
    # pymeta.MAML) refuses it, and the core must not return a loss for it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), bn(3, dims=1), nn.ReLU(), nn.Linear(3, 2)).double()
    maml = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    b = batch_for((4,), "cross_entropy", k=1, classes=2)
    with pytest.raises(ValueError, match="batch.support_x: .*more than 1 value per channel"):
        maml.meta_loss(b)
    with pytest.raises(ValueError, match="support_x: .*more than 1 value per channel"):
        maml.adapt(b.support_x, b.support_y, batched=True)
    maml.meta_loss(batch_for((4,), "cross_entropy", k=2, classes=2))  # two examples are fine


# ----------------------------------------------------------------------------- recomputed sweep
@pytest.fixture
def cache_limit():
    """Sets the core's activation cache limit for one test (pymeta._C), restoring it after."""
    from pymeta import _C

    default = _C.activation_cache_limit()
    yield _C.set_activation_cache_limit
    _C.set_activation_cache_limit(default)


def recomputed_under(limit, maml, batch, cache_limit):
    """(support passes, inner steps) the reverse sweep recomputed in one meta-step under the
    activation cache limit, after checking that its meta-loss and meta-gradient are those of
    the run that keeps everything (the default limit) and of the per-task reference."""
    from pymeta import _C

    params = list(maml.parameters())
    kept = maml.meta_loss(batch)
    kept_grads = grads_of(kept, params)
    before = _C.sweep_recomputed_passes(), _C.sweep_recomputed_steps()
    cache_limit(limit)
    got = maml.meta_loss(batch)
    counts = (_C.sweep_recomputed_passes() - before[0], _C.sweep_recomputed_steps() - before[1])
    grads = grads_of(got, params)
    assert rel_err(got, kept) < 1e-13
    assert_close_grads(grads, kept_grads)
    want = reference_loss(maml, batch, lr_lookup(maml), F.cross_entropy)
    assert rel_err(got, want) < TOL
    assert_close_grads(grads, grads_of(want, params))
    return counts


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("limit", [0, 160_000])
def test_a_sweep_that_recomputes_passes_gives_the_same_meta_gradient(net, limit, cache_limit):
    """Under the activation cache limit the inner loop keeps no support pass (0) or only the
    last ones (160 kB, of which passes get half: one or two of these passes of about 40-50
    kB), and the reverse sweep recomputes the others; under 0 it also recomputes the parameter
    iterates from theta_0. The meta-gradient is the same, also with learned per-step rates, a
    multi-step loss and per-step batch norm."""
    model, example = conv_net(net, seed=6)
    kwargs = dict(
        inner_steps=3, loss="cross_entropy", lr_mode="per_layer_step", learn_inner_lr=True,
        multi_step_loss=True, per_step_bn=True,
    )  # fmt: skip
    maml = pymeta.ModelAwareMAML(model, **kwargs)
    randomize_lrs(maml, seed=2, low=0.05, width=0.3)
    passes, steps = recomputed_under(limit, maml, batch_for(example, "cross_entropy"), cache_limit)
    # 3 tasks x 3 steps: all passes recomputed, or some of each. Iterates (tiny here) are kept
    # under 160 kB (in a quarter of it); under 0 only theta_0 and theta_3 are, and per task the
    # sweep runs 2 steps again for theta_2 and 1 for theta_1 (keeping no pass, as none fits).
    assert passes == 9 if limit == 0 else 0 < passes < 9, passes
    assert steps == (9 if limit == 0 else 0), steps


def test_steps_run_again_keep_the_pass_the_sweep_reads_next(cache_limit):
    """ResNet-12's case at 1 shot: iterates as big as support passes. A wide linear layer
    (256 x 64 weights, 131 kB per iterate in float64) after a small convolution over 4 support
    images (a pass of 60-70 kB: under limits up to 120 kB none fits in half the limit). Under
    180 kB one pass fits in half of it and no iterate in a quarter, so the inner loop keeps
    theta_0 and theta_3 and step 2's pass (the only step the sweep does not run again), and the
    sweep runs steps 0 and 1 again for theta_2 and step 0 for theta_1: those runs keep the
    passes of steps 1 and 0, and no pass is recomputed on its own (the earlier rule kept step
    0's pass in the inner loop and none from the runs again: 2 recomputed per task). The
    meta-gradient is that of the run that keeps everything."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(256, 64), nn.Tanh(), nn.Linear(64, 3),
    ).double()  # fmt: skip
    maml = pymeta.ModelAwareMAML(
        model, inner_steps=3, loss="cross_entropy", lr_mode="per_layer_step"
    )
    randomize_lrs(maml, seed=4, low=0.05, width=0.3)
    passes, steps = recomputed_under(
        180_000, maml, batch_for((1, 8, 8), "cross_entropy"), cache_limit
    )
    assert steps == 9  # 3 tasks x (2 + 1)
    assert passes == 0


@pytest.mark.parametrize("onednn_gemm", [True, False], ids=["onednn", "blas"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_one_example_per_task_leaves_the_parameters_alone(dtype, onednn_gemm):
    """With one support and one query example per task, a linear layer's output has one row per
    task, the bias broadcast to it is the bias's own shape, and a product that adds into it must
    add into a copy (a bias changed by meta_loss or adapt was a bug the fuzz tests found)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.ReLU())
    model = with_head(body, (1, 3, 3), 1).to(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    x = lambda: torch.randn(1, 1, 1, 3, 3, generator=g, dtype=dtype)  # noqa: E731
    y = lambda: torch.randn(1, 1, 1, generator=g, dtype=dtype)  # noqa: E731
    batch = pymeta.TaskBatch(x(), y(), x(), y())
    kwargs = dict(inner_lr=0.3, inner_steps=2, loss="mse")
    saved = pymeta._C.onednn_gemm()
    pymeta._C.set_onednn_gemm(onednn_gemm)
    try:
        aware = pymeta.ModelAwareMAML(model, **kwargs)
        loss = aware.meta_loss(batch)
        adapted = aware.adapt(batch.support_x, batch.support_y, batched=True)(batch.query_x)
    finally:
        pymeta._C.set_onednn_gemm(saved)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p.detach(), p0)
    want = pymeta.MAML(model, **kwargs).meta_loss(batch)
    tol = TOL if dtype == torch.float64 else 1e-5
    assert rel_err(loss, want) < tol
    assert rel_err(F.mse_loss(adapted[0], batch.query_y[0]), want) < tol
