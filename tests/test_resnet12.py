"""pymeta.models.resnet12: architecture, argument checks, exact MAML through the residual adds
(float64, against a per-task autograd loop) and a short meta-training run."""

import pytest
import torch
import torch.nn.functional as F
from parity import reference_meta_loss, rel_err
from torch import nn

import pymeta
from pymeta.models import ResidualBlock, resnet12

TOL = 1e-10
TINY = dict(widths=(2, 3, 4, 5), image_size=16)


def tiny(n_way=3, in_channels=3):
    torch.manual_seed(0)
    return resnet12(n_way, in_channels, **TINY).double()


def image_batch(tasks=2, n_way=3, k=1, q=2, channels=3, size=16, seed=0, protos_noise=None):
    """Random images (T, n_way * k, C, size, size) with class-major labels; with
    ``protos_noise``, each class's images are one random prototype per task plus that much
    noise (easy tasks: the classes differ, their labels are arbitrary per task)."""
    g = torch.Generator().manual_seed(seed)

    def images(m, protos):
        shape = (tasks, n_way * m, channels, size, size)
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if protos is None:
            return noise
        return protos.repeat_interleave(m, 1) + protos_noise * noise

    protos = None
    if protos_noise is not None:
        protos = torch.randn(tasks, n_way, channels, size, size, generator=g, dtype=torch.float64)
    labels = lambda m: torch.arange(n_way).repeat_interleave(m).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(images(k, protos), labels(k), images(q, protos), labels(q))


# ------------------------------------------------------------------ architecture


def test_architecture():
    model = resnet12(5, **TINY)
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16  # 4 blocks x (3 conv3x3 + 1 conv1x1 shortcut)
    assert sorted(c.kernel_size[0] for c in convs) == [1] * 4 + [3] * 12
    assert all(c.bias is None for c in convs)
    assert all(c.padding == (c.kernel_size[0] // 2,) * 2 for c in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 16 and not any(bn.track_running_stats for bn in bns)
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 12 and all(a.negative_slope == 0.1 for a in acts)
    for block, (c_in, c_out) in zip(blocks, [(3, 2), (2, 3), (3, 4), (4, 5)]):
        assert isinstance(block.body[-1], nn.BatchNorm2d)  # the last activation is after the add
        assert block.shortcut[0].in_channels == c_in and block.shortcut[0].out_channels == c_out
        assert isinstance(block.pool, nn.MaxPool2d) and block.pool.kernel_size == 2
    assert isinstance(model[-3], nn.AdaptiveAvgPool2d) and model[-3].output_size == 1
    assert isinstance(model[-1], nn.Linear)
    assert (model[-1].in_features, model[-1].out_features) == (5, 5)


def test_block_adds_shortcut_before_activation_and_pool():
    torch.manual_seed(0)
    block = ResidualBlock(3, 4).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    expected = F.max_pool2d(F.leaky_relu(block.body(x) + block.shortcut(x), 0.1), 2)
    out = block(x)
    assert out.shape == (2, 4, 4, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("image_size", [16, 21, 84])
def test_output_shape(image_size):
    model = resnet12(5, in_channels=1, widths=(2, 3, 4, 5), image_size=image_size)
    assert model(torch.randn(3, 1, image_size, image_size)).shape == (3, 5)


def test_default_widths():
    model = resnet12(5)
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert [b.shortcut[0].out_channels for b in blocks] == [64, 160, 320, 640]
    assert blocks[0].shortcut[0].in_channels == 3 and model[-1].in_features == 640


def test_fx_trace_sees_one_residual_add_per_block():
    model = tiny()
    traced = torch.fx.symbolic_trace(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in n.name]
    assert len(adds) == 4
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(n_way=0), ValueError, "n_way"),
        (dict(n_way=2.0), TypeError, "n_way"),
        (dict(in_channels=0), ValueError, "in_channels"),
        (
            dict(widths=(2, 3, 4)),
            ValueError,
            "widths: expected 4 positive ints, received (2, 3, 4)",
        ),
        (dict(widths=(2, 3, 0, 5)), ValueError, "widths"),
        (dict(widths=(2, 3, 4.0, 5)), ValueError, "widths"),
        (dict(widths=64), ValueError, "widths"),
        (dict(image_size=15), ValueError, "image_size: expected at least 16"),
        (dict(image_size=0), ValueError, "image_size"),
    ],
)
def test_argument_errors(kwargs, error, words):
    args = dict(n_way=5, widths=(2, 3, 4, 5), image_size=16)
    args.update(kwargs)
    with pytest.raises(error, match="received") as info:
        resnet12(**args)
    assert words in str(info.value)


# ------------------------------------------------------------------ MAML through residual adds


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_parity_with_per_task_loop(steps, first_order):
    model = tiny()
    maml = pymeta.MAML(
        model, inner_lr=0.1, inner_steps=steps, first_order=first_order, loss="cross_entropy"
    )
    batch = image_batch()
    params = list(model.parameters())
    loss = maml.meta_loss(batch)
    grads = torch.autograd.grad(loss, params)
    ref_loss = reference_meta_loss(model, batch, [0.1], steps, first_order, F.cross_entropy)
    ref_grads = torch.autograd.grad(ref_loss, params)
    assert rel_err(loss, ref_loss) < TOL
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert rel_err(g, r) < TOL, (name, rel_err(g, r))
    # Not vacuous: the meta-gradients are not all zero.
    assert float(torch.stack([g.abs().max() for g in grads]).max()) > 0


def test_meta_training_lowers_query_loss_after_adaptation():
    torch.manual_seed(0)
    model = resnet12(3, widths=(4, 4, 4, 4), image_size=16).double()
    maml = pymeta.MAML(model, inner_lr=0.5, loss="cross_entropy")
    held_out = image_batch(tasks=20, protos_noise=0.3, seed=999)

    def adapted_query_loss():
        adapted = maml.adapt(held_out.support_x, held_out.support_y)
        with torch.no_grad():
            logits = adapted(held_out.query_x)
        return float(F.cross_entropy(logits.flatten(0, 1), held_out.query_y.flatten()))

    before = adapted_query_loss()
    opt = torch.optim.Adam(maml.parameters(), lr=3e-2)
    for step in range(30):
        opt.zero_grad()
        maml.meta_loss(image_batch(tasks=4, protos_noise=0.3, seed=step)).backward()
        opt.step()
    after = adapted_query_loss()
    # Measured: 1.43 -> 0.82; chance (uniform logits) is log 3 = 1.10.
    assert after < 0.75 * before and after < 0.9, (before, after)


# ------------------------------------------------------------------ model-aware core


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_model_aware_equals_maml_and_the_per_task_loop(steps, first_order):
    model = tiny()
    kwargs = dict(inner_lr=0.1, inner_steps=steps, first_order=first_order, loss="cross_entropy")
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    assert aware.core_kind == "layered"
    batch = image_batch(k=2)
    params = list(model.parameters())
    got = aware.meta_loss(batch)
    grads = torch.autograd.grad(got, params)
    for want in (
        agnostic.meta_loss(batch),
        reference_meta_loss(model, batch, [0.1], steps, first_order, F.cross_entropy),
    ):
        assert rel_err(got, want) < TOL
        want_grads = torch.autograd.grad(want, params)
        scale = max(float(w.abs().max()) for w in want_grads)  # conv-before-BN grads are ~0
        err = max(float((g - w).abs().max()) for g, w in zip(grads, want_grads)) / scale
        assert err < TOL, err


def test_model_aware_adapt_equals_maml_adapt():
    model = tiny()
    aware = pymeta.ModelAwareMAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    agnostic = pymeta.MAML(model, inner_lr=0.1, inner_steps=2, loss="cross_entropy")
    batch = image_batch(k=2)
    got = aware.adapt(batch.support_x, batch.support_y)(batch.query_x)
    want = agnostic.adapt(batch.support_x, batch.support_y)(batch.query_x)
    assert rel_err(got, want) < TOL
