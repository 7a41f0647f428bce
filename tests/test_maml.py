"""pymeta.MAML against a plain per-task autograd reference (float64), and its API paths."""

import copy

import pytest
import torch
import torch.nn.functional as F
from parity import reference_meta_loss, rel_err, sinusoid_mse_before_after
from torch import nn

import pymeta

TOL = 1e-10


def mlp(widths=(1, 40, 40, 1), act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def conv_bn_net(n_way=3):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, n_way),
    ).double()


def regression_batch(tasks=4, k=5, q=6, seed=0, features=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return pymeta.TaskBatch(
        r(tasks, k, features), r(tasks, k, 1), r(tasks, q, features), r(tasks, q, 1)
    )


def image_batch(tasks=3, n_way=3, k=2, q=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    labels = lambda n: torch.arange(n_way).repeat_interleave(n).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(
        r(tasks, n_way * k, 1, 8, 8), labels(k), r(tasks, n_way * q, 1, 8, 8), labels(q)
    )


def assert_parity(maml, batch, steps, first_order, loss_fn):
    """pymeta's meta-loss and every meta-gradient equal the per-task reference's."""
    meta_params = list(maml.parameters())
    loss = maml.meta_loss(batch)
    grads = torch.autograd.grad(loss, meta_params, allow_unused=True)
    ref_loss = reference_meta_loss(
        maml.module, batch, maml.inner_lr.as_list(), steps, first_order, loss_fn
    )
    ref_grads = torch.autograd.grad(ref_loss, meta_params, allow_unused=True)
    assert rel_err(loss, ref_loss) < TOL
    for p, g, r in zip(meta_params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        assert rel_err(g, r) < TOL or float((g - r).abs().max()) < 1e-14, (
            tuple(p.shape),
            rel_err(g, r),
        )


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("learn_inner_lr", [False, "scalar", "per_parameter"])
@pytest.mark.parametrize("vectorize", ["auto", False])
def test_mlp_parity(steps, first_order, learn_inner_lr, vectorize):
    torch.manual_seed(1)
    maml = pymeta.MAML(
        mlp(),
        inner_lr=0.05,
        inner_steps=steps,
        first_order=first_order,
        learn_inner_lr=learn_inner_lr,
        vectorize=vectorize,
    )
    assert maml._forward.vectorized is (vectorize == "auto")
    assert_parity(maml, regression_batch(), steps, first_order, F.mse_loss)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.LeakyReLU])
def test_mlp_parity_cross_entropy_activations(act):
    torch.manual_seed(2)
    maml = pymeta.MAML(
        mlp((6, 16, 16, 4), act),
        inner_lr=0.3,
        inner_steps=3,
        loss="cross_entropy",
        learn_inner_lr="per_parameter",
    )
    g = torch.Generator().manual_seed(3)
    x = lambda k: torch.randn(5, k, 6, generator=g, dtype=torch.float64)  # noqa: E731
    y = lambda k: torch.randint(0, 4, (5, k), generator=g)  # noqa: E731
    assert_parity(maml, pymeta.TaskBatch(x(8), y(8), x(10), y(10)), 3, False, F.cross_entropy)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("learn_inner_lr", [False, "scalar", "per_parameter"])
def test_conv_batchnorm_parity(steps, first_order, learn_inner_lr):
    torch.manual_seed(4)
    maml = pymeta.MAML(
        conv_bn_net(),
        inner_lr=0.2,
        inner_steps=steps,
        first_order=first_order,
        loss="cross_entropy",
        learn_inner_lr=learn_inner_lr,
    )
    # Second order through training-mode batch norm is wrong under vmap in torch 2.13: the
    # module must run task by task.
    assert maml._forward.vectorized is False
    assert_parity(maml, image_batch(), steps, first_order, F.cross_entropy)


def test_custom_callable_loss_matches_builtin():
    torch.manual_seed(5)
    model = mlp()
    a = pymeta.MAML(model, inner_steps=2, loss="mse")
    b = pymeta.MAML(model, inner_steps=2, loss=lambda p, t: ((p - t) ** 2).mean())
    batch = regression_batch()
    torch.testing.assert_close(a.meta_loss(batch), b.meta_loss(batch), rtol=1e-14, atol=0)


def test_frozen_parameters_stay_fixed_in_inner_loop():
    torch.manual_seed(6)
    model = mlp()
    model[0].weight.requires_grad_(False)
    maml = pymeta.MAML(model, inner_steps=2)
    batch = regression_batch()
    adapted = maml.adapt(batch.support_x, batch.support_y)
    assert "0.weight" not in adapted.params and "0.bias" in adapted.params
    maml.meta_loss(batch).backward()
    assert model[0].weight.grad is None and model[0].bias.grad is not None


def test_learned_lrs_are_meta_parameters():
    model = mlp()
    n_model = len(list(model.parameters()))
    assert len(list(pymeta.MAML(model).parameters())) == n_model
    assert len(list(pymeta.MAML(model, learn_inner_lr=True).parameters())) == n_model + 1
    per = pymeta.MAML(model, inner_lr=0.3, learn_inner_lr="per_parameter")
    lrs = per.inner_lr.as_list()
    assert [lr.shape for lr in lrs] == [p.shape for p in model.parameters()]
    assert all(bool((lr == 0.3).all()) for lr in lrs)


def test_adapt_single_and_batched_match_meta_loss_inner_loop():
    torch.manual_seed(7)
    maml = pymeta.MAML(mlp(), inner_lr=0.05, inner_steps=3)
    batch = regression_batch()
    before = [p.clone() for p in maml.parameters()]
    adapted = maml.adapt(batch.support_x, batch.support_y)
    pred = adapted(batch.query_x)
    assert pred.shape == batch.query_y.shape and not pred.requires_grad
    q_loss = ((pred - batch.query_y) ** 2).flatten(1).mean(1).mean()
    torch.testing.assert_close(q_loss, maml.meta_loss(batch).detach(), rtol=1e-12, atol=0)
    single = maml.adapt(batch.support_x[1], batch.support_y[1])
    torch.testing.assert_close(single(batch.query_x[1]), pred[1], rtol=1e-12, atol=1e-14)
    for a, b in zip(before, maml.parameters()):
        assert torch.equal(a, b)
    more = maml.adapt(batch.support_x, batch.support_y, steps=10)
    assert not torch.allclose(more(batch.query_x), pred)


def test_adapt_with_batch_norm_single_task():
    torch.manual_seed(8)
    maml = pymeta.MAML(conv_bn_net(), inner_lr=0.2, loss="cross_entropy")
    batch = image_batch()
    adapted = maml.adapt(batch.support_x[0], batch.support_y[0])
    assert adapted(batch.query_x[0]).shape == (6, 3)


def test_learn2learn_style_clone_adapt_matches_meta_loss():
    torch.manual_seed(9)
    maml = pymeta.MAML(mlp(), inner_lr=0.05, learn_inner_lr="scalar")
    batch = regression_batch(tasks=3)
    total = 0
    for t in range(3):
        learner = maml.clone()
        for _ in range(2):
            learner.adapt(F.mse_loss(learner(batch.support_x[t]), batch.support_y[t]))
        total = total + F.mse_loss(learner(batch.query_x[t]), batch.query_y[t])
    total = total / 3
    grads = torch.autograd.grad(total, list(maml.parameters()))
    ref = pymeta.MAML(maml.module, inner_steps=2)
    ref.inner_lr = maml.inner_lr
    ref_loss = ref.meta_loss(batch)
    ref_grads = torch.autograd.grad(ref_loss, list(maml.parameters()))
    assert rel_err(total, ref_loss) < TOL
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < TOL


@pytest.mark.parametrize("net", ["mlp", "conv-bn"])
@pytest.mark.parametrize("learn_inner_lr", [False, "per_parameter"])
def test_meta_loss_under_no_grad_still_adapts(net, learn_inner_lr):
    # Evaluation under torch.no_grad() must score the adapted model (it scored the unadapted
    # one: zero inner gradients), like ModelAwareMAML does.
    torch.manual_seed(0)
    if net == "mlp":
        model, batch, loss = mlp().double(), regression_batch(), "mse"
    else:
        model, batch, loss = conv_bn_net().double(), image_batch(), "cross_entropy"
    maml = pymeta.MAML(model, inner_lr=0.3, inner_steps=2, loss=loss, learn_inner_lr=learn_inner_lr)
    want = maml.meta_loss(batch).detach()
    with torch.no_grad():
        got = maml.meta_loss(batch)
    assert not got.requires_grad
    assert rel_err(got, want) < TOL
    unadapted = pymeta.MAML(model, inner_lr=0.0, loss=loss).meta_loss(batch).detach()
    assert rel_err(unadapted, want) > 1e-3  # the check above can tell the two apart


def test_forward_runs_the_meta_model():
    model = mlp()
    x = torch.randn(3, 1, dtype=torch.float64)
    torch.testing.assert_close(pymeta.MAML(model)(x), model(x))


def test_state_dict_round_trip_includes_learned_lrs():
    a = pymeta.MAML(mlp(), learn_inner_lr="per_parameter")
    with torch.no_grad():
        a.inner_lr.lrs[0].fill_(0.123)
    b = pymeta.MAML(mlp(), learn_inner_lr="per_parameter")
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert bool((b.inner_lr.lrs[0] == 0.123).all())


def test_sinusoid_meta_training_learns_to_adapt():
    """A short run: post-adaptation MSE ends well below pre-adaptation MSE."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )
    before, after = sinusoid_mse_before_after(pymeta.MAML(model, inner_lr=0.01))
    assert after < 0.6 * before, (before, after)


class DataDependent(nn.Module):
    """Control flow on a tensor's value: vmap cannot batch it, the loop can."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, x):
        out = self.lin(x)
        return out * 2 if float(out.detach().sum()) > 0 else out


def test_auto_falls_back_to_the_task_loop_when_vmap_fails():
    torch.manual_seed(10)
    auto = pymeta.MAML(DataDependent().double(), inner_steps=2)
    batch = regression_batch()
    with pytest.warns(UserWarning, match="cannot be vmapped"):
        loss = auto.meta_loss(batch)
    assert auto._forward.vectorized is False
    loop = pymeta.MAML(auto.module, inner_steps=2, vectorize=False)
    torch.testing.assert_close(loss, loop.meta_loss(batch), rtol=1e-14, atol=0)
    with pytest.raises(RuntimeError, match="vmap"):
        pymeta.MAML(auto.module, vectorize=True).meta_loss(batch)
