"""Per-step batch norm running statistics (MAML++, ``track_bn_stats``): the batch statistics the
layered core reports against a plain autograd inner loop, their running average, and adapted
models that predict with them."""

import pytest
import torch
import torch.nn.functional as F
from test_model_aware_conv import batch_for, bn
from torch import nn
from torch.func import functional_call

import pymeta

EXAMPLE = (1, 6, 6)


def net(seed=0, momentum=0.1):
    """conv → BatchNorm2d → ReLU → pool → flatten → linear → BatchNorm1d (no affine) → linear."""
    torch.manual_seed(seed)
    norm1d = bn(5, affine=False, dims=1)
    norm1d.momentum = momentum
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), bn(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(27, 5), norm1d, nn.Tanh(), nn.Linear(5, 3),
    ).double()  # fmt: skip


def bn_input_stats(model, params, x):
    """(2, C): mean and unbiased variance of the inputs of the model's batch norm layers."""
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    out = functional_call(model, params, (x,))
    for h in hooks:
        h.remove()
    dims = lambda t: [d for d in range(t.dim()) if d != 1]  # noqa: E731
    mean = torch.cat([t.mean(dims(t)) for t in seen])
    var = torch.cat([t.var(dims(t), unbiased=True) for t in seen])
    return torch.stack([mean, var]), out


def reference_bn_stats(model, batch, lr, steps):
    """(T, steps + 1, 2, C) by a plain autograd inner loop (every layer adapts)."""
    per_task = []
    for t in range(batch.support_x.shape[0]):
        params = {n: p.detach().requires_grad_() for n, p in model.named_parameters()}
        rows = []
        for _ in range(steps):
            stats, out = bn_input_stats(model, params, batch.support_x[t])
            rows.append(stats)
            loss = F.cross_entropy(out, batch.support_y[t])
            grads = torch.autograd.grad(loss, list(params.values()))
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
        rows.append(bn_input_stats(model, params, batch.query_x[t])[0])
        per_task.append(torch.stack(rows))
    return torch.stack(per_task).detach()


def learner(model, steps=2, **kw):
    kw.setdefault("multi_step_loss", True)
    return pymeta.ModelAwareMAML(
        model, inner_lr=0.3, inner_steps=steps, loss="cross_entropy", track_bn_stats=True, **kw
    )


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_core_reports_the_batch_statistics_of_every_step(steps, first_order):
    model = net()
    maml = learner(model, steps=steps, first_order=first_order)
    b = batch_for(EXAMPLE, "cross_entropy", tasks=3, k=4, q=5)
    args = maml._core_args(b.support_x, b.support_y, b.query_x, b.query_y)
    stats = maml._loss_op(*args, True, False)[4]
    assert stats.shape == (3, steps + 1, 2, 3 + 5)
    torch.testing.assert_close(
        stats, reference_bn_stats(model, b, 0.3, steps), rtol=1e-9, atol=1e-9
    )


def test_a_skipped_query_pass_leaves_its_row_nan_and_the_running_row_alone():
    maml = learner(net(), steps=2, multi_step_loss=[1.0, 0.0])  # no query pass after step 2
    b = batch_for(EXAMPLE, "cross_entropy")
    stats = maml._loss_op(
        *maml._core_args(b.support_x, b.support_y, b.query_x, b.query_y), False, False
    )[4]
    assert torch.isfinite(stats[:, :2]).all() and torch.isnan(stats[:, 2]).all()
    maml.meta_loss(b)
    running = maml.bn_running_stats
    assert torch.equal(running.running_mean[2], torch.zeros(8, dtype=torch.float64))
    assert torch.equal(running.running_var[2], torch.ones(8, dtype=torch.float64))
    torch.testing.assert_close(running.running_mean[:2], 0.1 * stats[:, :2, 0].mean(0))


def test_mlp_core_reports_no_statistics():
    maml = pymeta.ModelAwareMAML(nn.Sequential(nn.Linear(2, 3)).double(), inner_steps=2)
    x = lambda: torch.randn(2, 4, 2, dtype=torch.float64)  # noqa: E731
    y = lambda: torch.randn(2, 4, 3, dtype=torch.float64)  # noqa: E731
    stats = maml._loss_op(*maml._core_args(x(), y(), x(), y()), False, False)[4]
    assert stats.shape == (2, 3, 2, 0)


def test_meta_loss_averages_statistics_in_training_mode_only():
    model = net(momentum=None)  # the BatchNorm1d takes the cumulative average
    maml = learner(model)
    stats = maml.bn_running_stats
    batches = [batch_for(EXAMPLE, "cross_entropy", seed=s) for s in (1, 2)]
    means = []
    for b in batches:
        args = maml._core_args(b.support_x, b.support_y, b.query_x, b.query_y)
        means.append(maml._loss_op(*args, False, False)[4].mean(0))
        maml.meta_loss(b)
    # BatchNorm2d (3 channels): momentum 0.1 from (0, 1); BatchNorm1d (5): the plain mean.
    expect_mean = torch.cat(
        [(0.9 * 0.1 * means[0] + 0.1 * means[1])[:, 0, :3], (means[0] + means[1])[:, 0, 3:] / 2],
        dim=1,
    )
    expect_var = torch.cat(
        [
            0.81 + (0.9 * 0.1 * means[0] + 0.1 * means[1])[:, 1, :3],
            (means[0] + means[1])[:, 1, 3:] / 2,
        ],
        dim=1,
    )
    torch.testing.assert_close(stats.running_mean, expect_mean)
    torch.testing.assert_close(stats.running_var, expect_var)
    assert int(stats.num_batches_tracked) == 2
    maml.eval()
    with torch.no_grad():
        maml.meta_loss(batches[0])
    torch.testing.assert_close(stats.running_mean, expect_mean)
    assert int(stats.num_batches_tracked) == 2
    layer = stats.layer_stats(1)
    assert list(layer) == ["1", "6"] and layer["6"][0].shape == (5,)


def manual_eval_forward(model, params, stats, x):
    """The test network by hand with F.batch_norm(training=False) on the running statistics."""
    (m2, v2), (m1, v1) = stats["1"], stats["6"]
    h = F.conv2d(x, params["0.weight"], params["0.bias"], padding=1)
    h = F.batch_norm(h, m2, v2, params["1.weight"], params["1.bias"], False, 0.0, 1e-5)
    h = F.max_pool2d(F.relu(h), 2).flatten(1)
    h = F.linear(h, params["5.weight"], params["5.bias"])
    h = torch.tanh(F.batch_norm(h, m1, v1, None, None, False, 0.0, 1e-5))
    return F.linear(h, params["8.weight"], params["8.bias"])


@pytest.mark.parametrize("per_step_bn", [False, True])
def test_adapted_model_predicts_with_the_running_statistics(per_step_bn):
    model = net()
    maml = learner(model, per_step_bn=per_step_bn)
    for seed in (1, 2, 3):
        maml.meta_loss(batch_for(EXAMPLE, "cross_entropy", seed=seed)).backward()
    b = batch_for(EXAMPLE, "cross_entropy", seed=9)
    for steps in (1, 2):
        running = maml.adapt(b.support_x, b.support_y, steps=steps, bn_stats="running")
        batch = maml.adapt(b.support_x, b.support_y, steps=steps)
        for name in running.params:  # adaptation itself is unchanged
            torch.testing.assert_close(running.params[name], batch.params[name])
        pred = running(b.query_x)
        stats = maml.bn_running_stats.layer_stats(steps)
        for t in range(b.query_x.shape[0]):
            params = {n: p[t] for n, p in running.params.items()}
            expect = manual_eval_forward(model, params, stats, b.query_x[t])
            torch.testing.assert_close(pred[t], expect)
        # One example at a time gives the same predictions: nothing depends on the batch.
        singles = torch.cat([running(b.query_x[:, i : i + 1]) for i in range(5)], dim=1)
        torch.testing.assert_close(singles, pred)
        assert not torch.allclose(batch(b.query_x), pred)
    assert model.training  # the module the learner wraps stays as it was


def test_running_stats_are_saved_with_the_learner():
    maml = learner(net())
    maml.meta_loss(batch_for(EXAMPLE, "cross_entropy"))
    other = learner(net(seed=5))
    other.load_state_dict(maml.state_dict())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(
            getattr(other.bn_running_stats, name), getattr(maml.bn_running_stats, name)
        )


def test_bad_running_stats_requests_are_explained():
    b = batch_for(EXAMPLE, "cross_entropy")
    plain = pymeta.ModelAwareMAML(net(), loss="cross_entropy")
    assert plain.bn_running_stats is None
    with pytest.raises(ValueError, match="track_bn_stats=True"):
        plain.adapt(b.support_x, b.support_y, bn_stats="running")
    maml = learner(net())
    with pytest.raises(
        ValueError, match="bn_stats: expected 'batch' or 'running', received 'eval'"
    ):
        maml.adapt(b.support_x, b.support_y, bn_stats="eval")
    with pytest.raises(RuntimeError, match="no running statistics yet"):
        maml.adapt(b.support_x, b.support_y, bn_stats="running")
    maml.meta_loss(b)
    with pytest.raises(ValueError, match=r"steps: running statistics exist for 0..2 .* received 3"):
        maml.adapt(b.support_x, b.support_y, steps=3, bn_stats="running")
    with pytest.raises(TypeError, match="track_bn_stats: expected a bool"):
        pymeta.ModelAwareMAML(net(), track_bn_stats="yes")
    with pytest.raises(ValueError, match="track_bn_stats: the model has no BatchNorm"):
        pymeta.ModelAwareMAML(nn.Sequential(nn.Linear(2, 2)), track_bn_stats=True)
