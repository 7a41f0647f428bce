"""The model-aware core's task-batched execution (csrc/net/layers.h): several tasks run as one,
their channels folded side by side, convolutions grouped, linear layers as batched matrix
products. In float64 it must equal running the tasks one at a time, to 1e-12: the losses, every
meta-gradient (learned rates and per-step batch norm included), the adapted parameters and the
batch statistics, for MLPs, conv4, graph networks and ResNet-12, first and second order."""

import contextlib

import pytest
import torch
from test_model_aware_conv import batch_for, conv_net
from test_model_aware_graph import graph_net
from test_resnet12 import image_batch, tiny
from torch import nn

import pymeta
from pymeta import _C

TOL = 1e-12
TASKS = 5  # chunks of 2 leave one task over: an uneven last chunk is covered too


@contextlib.contextmanager
def core_settings(task_batch, cpu_fast_paths=(True, True, True, True), mlp_fast_path=False):
    """The core's process-wide settings for one run, restored after."""
    saved = (_C.task_batch(), _C.cpu_fast_paths(), _C.mlp_fast_path())
    _C.set_task_batch(task_batch)
    _C.set_cpu_fast_paths(*cpu_fast_paths)
    _C.set_mlp_fast_path(mlp_fast_path)
    try:
        yield
    finally:
        _C.set_task_batch(saved[0])
        _C.set_cpu_fast_paths(*saved[1])
        _C.set_mlp_fast_path(saved[2])


def run(maml, batch, task_batch, **settings):
    """(meta-loss, meta-gradients, adapted query predictions, running stats) under one setting."""
    with core_settings(task_batch, **settings):
        assert maml.core_kind == "layered"
        loss = maml.meta_loss(batch)
        params = list(maml.parameters())
        # Per-step batch norm replaces the module's own batch norm weights: unused, zero.
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        adapted = maml.adapt(batch.support_x, batch.support_y)(batch.query_x)
    stats = maml.bn_running_stats.state_dict() if maml.bn_running_stats is not None else {}
    return loss.detach(), grads, adapted.detach(), stats


def scale_err(a, b):
    """max |a - b| over the largest |b| of the whole group (a gradient that should be 0 is
    rounding noise, not a relative error of 1)."""
    return float((a - b).abs().max())


def assert_batched_equals_per_task(make_maml, batch, **settings):
    """Chunks of 2 and of all tasks against one task at a time, from the same initial state."""
    results = {}
    for n in (1, 2, TASKS):
        maml = make_maml()
        results[n] = run(maml, batch, n, **settings)
    loss1, grads1, adapted1, stats1 = results[1]
    gscale = max(float(g.abs().max()) for g in grads1)
    for n in (2, TASKS):
        loss, grads, adapted, stats = results[n]
        assert scale_err(loss, loss1) <= TOL * float(loss1.abs()), n
        assert scale_err(adapted, adapted1) <= TOL * float(adapted1.abs().max()), n
        assert gscale > 0
        for g, g1 in zip(grads, grads1):
            assert scale_err(g, g1) <= TOL * gscale, n
        assert stats.keys() == stats1.keys()
        for k in stats1:
            assert torch.allclose(stats[k], stats1[k], rtol=TOL, atol=0), (n, k)


def maml_factory(model_fn, **kwargs):
    """A fresh ModelAwareMAML on a fresh copy of the model per run, with learned rates set off
    their initial value (seeded), so every setting starts from the same state."""

    def make():
        maml = pymeta.ModelAwareMAML(model_fn(), **kwargs)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for lr in maml.inner_lrs():
                lr.copy_(0.05 + 0.3 * torch.rand(lr.shape, generator=g, dtype=lr.dtype))
            for p in getattr(maml, "bn_steps", []):
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        return maml

    return make


def mlp(batch_norm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 6)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(6, track_running_stats=False))
    layers += [nn.Tanh(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).double()


def conv4():
    torch.manual_seed(0)
    return pymeta.models.conv4(3, in_channels=1, hidden=4, image_size=16).double()


NETWORKS = {
    # name: (model factory, batch)
    "mlp": (mlp, lambda loss: batch_for((3,), loss, tasks=TASKS)),
    "mlp-batchnorm": (lambda: mlp(True), lambda loss: batch_for((3,), loss, tasks=TASKS)),
    "conv4": (conv4, lambda loss: batch_for((1, 16, 16), loss, tasks=TASKS)),
    "resnet12": (tiny, lambda loss: image_batch(tasks=TASKS) if loss == "cross_entropy" else None),
    "dense": (lambda: graph_net("dense")[0], lambda loss: batch_for((2, 8, 8), loss, tasks=TASKS)),
    "functional": (
        lambda: graph_net("functional")[0],
        lambda loss: batch_for((2, 8, 8), loss, tasks=TASKS),
    ),
    "strided-avgpool": (
        lambda: conv_net("strided-avgpool-smooth")[0],
        lambda loss: batch_for(conv_net("strided-avgpool-smooth")[1], loss, tasks=TASKS),
    ),
}


@pytest.mark.parametrize("net", list(NETWORKS))
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_mode", ["scalar", "per_layer_step", "per_parameter"])
def test_batched_equals_one_task_at_a_time(net, first_order, lr_mode):
    model_fn, batch_fn = NETWORKS[net]
    make = maml_factory(
        model_fn, inner_steps=2, first_order=first_order, loss="cross_entropy", lr_mode=lr_mode,
        learn_inner_lr=True,
    )  # fmt: skip
    assert_batched_equals_per_task(make, batch_fn("cross_entropy"))


@pytest.mark.parametrize("net", ["mlp", "conv4", "functional"])
def test_mse_loss_batched(net):
    model_fn, batch_fn = NETWORKS[net]
    make = maml_factory(model_fn, inner_steps=3, loss="mse")
    assert_batched_equals_per_task(make, batch_fn("mse"))


@pytest.mark.parametrize("net", ["conv4", "resnet12", "dense"])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_plus_plus_options_batched(net, first_order):
    """Per-step batch norm, per-step learned rates, the multi-step loss and running statistics."""
    model_fn, batch_fn = NETWORKS[net]
    make = maml_factory(
        model_fn, inner_steps=3, first_order=first_order, loss="cross_entropy",
        lr_mode="per_layer_step", learn_inner_lr=True, multi_step_loss=True, per_step_bn=True,
        track_bn_stats=True,
    )  # fmt: skip
    assert_batched_equals_per_task(make, batch_fn("cross_entropy"))


HEAD_ONLY = dict(adapt_layers="head", learn_inner_lr=True)
PER_PARAMETER = dict(lr_mode="per_parameter", learn_inner_lr=True)


@pytest.mark.parametrize(
    ("net", "options", "fast_paths"),
    [
        ("conv4", HEAD_ONLY, True),
        ("resnet12", HEAD_ONLY, True),
        ("mlp-batchnorm", HEAD_ONLY, True),
        # The ATen-only rules (what CUDA runs) in the batched layout.
        ("conv4", PER_PARAMETER, False),
        ("resnet12", PER_PARAMETER, False),
        ("dense", PER_PARAMETER, False),
    ],
)
def test_head_only_and_aten_rules_batched(net, options, fast_paths):
    model_fn, batch_fn = NETWORKS[net]
    make = maml_factory(model_fn, inner_steps=2, loss="cross_entropy", **options)
    paths = (fast_paths,) * 4
    assert_batched_equals_per_task(make, batch_fn("cross_entropy"), cpu_fast_paths=paths)


def test_batched_with_recomputed_passes():
    """A zero activation cache makes the sweep recompute every pass and iterate, batched too."""
    model_fn, batch_fn = NETWORKS["resnet12"]
    make = maml_factory(model_fn, inner_steps=3, loss="cross_entropy")
    default = _C.activation_cache_limit()
    _C.set_activation_cache_limit(0)
    try:
        assert_batched_equals_per_task(make, batch_fn("cross_entropy"))
    finally:
        _C.set_activation_cache_limit(default)


def test_the_mlp_fast_path_equals_the_batched_layered_rules():
    model_fn, batch_fn = NETWORKS["mlp"]
    make = maml_factory(
        model_fn, inner_steps=2, loss="cross_entropy", lr_mode="per_parameter", learn_inner_lr=True
    )
    batch = batch_fn("cross_entropy")
    maml = make()
    with core_settings(0, mlp_fast_path=True):
        assert maml.core_kind == "mlp"
        loss = maml.meta_loss(batch)
        grads = torch.autograd.grad(loss, list(maml.parameters()))
    loss = loss.detach()
    batched = run(make(), batch, TASKS)
    assert scale_err(batched[0], loss) <= TOL * float(loss.abs())
    gscale = max(float(g.abs().max()) for g in grads)
    for g, want in zip(batched[1], grads):
        assert scale_err(g, want) <= TOL * gscale


def test_task_batch_setting():
    saved = _C.task_batch()
    try:
        _C.set_task_batch(3)
        assert _C.task_batch() == 3
        with pytest.raises(RuntimeError, match=r"set_task_batch: n must be >= 0"):
            _C.set_task_batch(-1)
    finally:
        _C.set_task_batch(saved)
    assert _C.task_batch() == saved == 0  # the default chooses by device
