"""ModelAwareMAML.compile_step: the meta-training step in one call must leave the parameters,
the optimizer state and the running statistics where ``zero_grad(); meta_loss(batch).backward();
[clip_grad_norm_]; optimizer.step()`` leaves them, step after step, with schedulers and
checkpoint/resume; and refuse what it does not implement."""

import copy

import pytest
import torch
from torch import nn

import pymeta

STEPS = 100


def sinusoid_learner(**kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    )
    return pymeta.ModelAwareMAML(model.double(), inner_lr=0.02, **kwargs)


def conv_learner():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 4 * 4, 3),
    ).double()  # fmt: skip
    return pymeta.ModelAwareMAML(
        model, inner_lr=0.1, inner_steps=2, loss="cross_entropy", lr_mode="per_layer_step",
        learn_inner_lr=True, multi_step_loss=True, per_step_bn=True, track_bn_stats=True,
    )  # fmt: skip


def sinusoid_batches(n, seed=0):
    tasks = pymeta.tasks.Sinusoid(k_support=5, k_query=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return [tasks.sample(8, g) for _ in range(n)]


def image_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(6, 8, 1, 8, 8, generator=g, dtype=torch.float64)
    tasks = pymeta.tasks.FewShot(images, n_way=3, k_shot=1, k_query=2)
    return [tasks.sample(4, g) for _ in range(n)]


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: torch.optim.Adam(
        p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01
    ),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "sgd": lambda p: torch.optim.SGD(p, lr=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(
        p, lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=1e-3
    ),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True),
}


def train_unfused(maml, opt, batches, max_grad_norm=None, scheduler=None):
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = maml.meta_loss(batch)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(maml.parameters(), max_grad_norm)
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def train_compiled(maml, opt, batches, max_grad_norm=None, scheduler=None):
    step = maml.compile_step(opt, max_grad_norm=max_grad_norm)
    losses = []
    for batch in batches:
        losses.append(step(batch))
        if scheduler is not None:
            scheduler.step()
    return torch.stack(losses)


def assert_same(a, b, tol=1e-10):
    """Parameters, buffers and optimizer state of two (maml, optimizer) pairs."""
    (ma, oa), (mb, ob) = a, b
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        if x.is_floating_point():
            assert float((x - y).abs().max()) <= tol * max(1.0, float(y.abs().max())), name
        else:
            assert torch.equal(x, y), name
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            x, y = sa[k][key], sb[k][key]
            assert float((torch.as_tensor(x) - torch.as_tensor(y)).abs().max()) <= tol * max(
                1.0, float(torch.as_tensor(y).abs().max())
            ), (k, key)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_100_steps_equal_the_unfused_loop(optimizer):
    batches = sinusoid_batches(STEPS)
    a = sinusoid_learner(lr_mode="per_parameter", learn_inner_lr=True)
    b = copy.deepcopy(a)
    oa, ob = OPTIMIZERS[optimizer](a.parameters()), OPTIMIZERS[optimizer](b.parameters())
    la = train_unfused(a, oa, batches)
    lb = train_compiled(b, ob, batches)
    assert float((la - lb).abs().max()) <= 1e-10 * float(la.abs().max())
    assert_same((a, oa), (b, ob))
    assert all(torch.equal(p.grad, q.grad) or float((p.grad - q.grad).abs().max()) < 1e-8
               for p, q in zip(a.parameters(), b.parameters()))  # fmt: skip


def test_maml_plus_plus_options_and_running_statistics():
    batches = image_batches(20)
    a = conv_learner()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    train_unfused(a, oa, batches)
    train_compiled(b, ob, batches)
    assert int(b.bn_running_stats.num_batches_tracked) == 20
    assert_same((a, oa), (b, ob), tol=1e-9)


def test_scheduler_and_clipping():
    batches = sinusoid_batches(30)
    a = sinusoid_learner()
    b = copy.deepcopy(a)
    oa, ob = torch.optim.Adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=7, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=7, gamma=0.5)
    # A norm below the gradients' so that clipping acts on most steps.
    train_unfused(a, oa, batches, max_grad_norm=0.5, scheduler=sa)
    train_compiled(b, ob, batches, max_grad_norm=0.5, scheduler=sb)
    assert ob.param_groups[0]["lr"] == oa.param_groups[0]["lr"] < 1e-2
    assert_same((a, oa), (b, ob))


def test_checkpoint_resume_and_switching_paths():
    """5 compiled steps, a state_dict round trip, then 5 more, equal 10 uninterrupted unfused
    steps; and the unfused loop continues from a compiled step's optimizer state."""
    batches = sinusoid_batches(10)
    ref = sinusoid_learner()
    oref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    train_unfused(ref, oref, batches)

    first = copy.deepcopy(sinusoid_learner())
    ofirst = torch.optim.Adam(first.parameters(), lr=1e-2)
    train_compiled(first, ofirst, batches[:5])
    saved = {"model": copy.deepcopy(first.state_dict()), "opt": copy.deepcopy(ofirst.state_dict())}
    resumed = sinusoid_learner()
    resumed.load_state_dict(saved["model"])
    oresumed = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    oresumed.load_state_dict(saved["opt"])
    train_compiled(resumed, oresumed, batches[5:])
    assert_same((resumed, oresumed), (ref, oref))

    train_unfused(first, ofirst, batches[5:])  # the unfused loop continues the fused state
    assert_same((first, ofirst), (ref, oref))


def test_refusals_name_the_argument():
    maml = sinusoid_learner()
    with pytest.raises(TypeError, match=r"optimizer: expected torch.optim.Adam, AdamW or SGD"):
        maml.compile_step(torch.optim.RMSprop(maml.parameters()))
    with pytest.raises(ValueError, match=r"optimizer: amsgrad=True is not supported"):
        maml.compile_step(torch.optim.Adam(maml.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match=r"optimizer: it updates a tensor that is not one of"):
        maml.compile_step(torch.optim.Adam([nn.Parameter(torch.zeros(2))]))
    with pytest.raises(ValueError, match=r"max_grad_norm: expected a number > 0"):
        maml.compile_step(torch.optim.Adam(maml.parameters()), max_grad_norm=0)
    step = maml.compile_step(torch.optim.Adam(maml.parameters()))
    with pytest.raises(TypeError, match=r"batch: expected a pymeta.TaskBatch"):
        step((1, 2))
    bad = sinusoid_batches(1)[0]
    with pytest.raises(TypeError, match=r"batch.support_x: expected dtype torch.float64"):
        step(pymeta.TaskBatch(bad.support_x.float(), bad.support_y, bad.query_x, bad.query_y))


def test_the_outer_update_ops_match_torch_optim_directly():
    """The ops on their own, float32, 100 steps against torch.optim on the same gradients. On the
    CPU each tensor's update is one loop in torch's operation order; ATen's vectorised kernels
    fuse some multiply-adds, so a few last bits may differ, never more than float rounding."""
    g = torch.Generator().manual_seed(0)
    # 15 and 4 elements: ATen's scalar tails; 40 x 40: its vectorised body.
    params = [
        torch.randn(5, 3, generator=g),
        torch.randn(4, generator=g),
        torch.randn(40, 40, generator=g),
    ]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(100)]
    for make in OPTIMIZERS.values():
        ref = [p.clone().requires_grad_() for p in params]
        opt = make(ref)
        mine = [p.clone().requires_grad_() for p in params]
        mopt = make(mine)
        step = _OuterOnly(mopt)
        for gs in grads:
            for p, gr in zip(ref, gs):
                p.grad = gr.clone()
            opt.step()
            step(mine, [gr.clone() for gr in gs])
        name = type(opt).__name__
        for x, y in zip(mine, ref):
            x, y = x.detach(), y.detach()
            assert float((x - y).abs().max()) <= 1e-6 * float(y.abs().max()), name
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            for p, q in zip(mine, ref):
                a, b = mopt.state[p].get(key), opt.state[q].get(key)
                assert (a is None) == (b is None), (name, key)
                if a is not None:
                    assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max()), (name, key)
        for p, q in zip(mine, ref):
            if "step" in opt.state[q]:
                assert torch.equal(mopt.state[p]["step"], opt.state[q]["step"]), name


def test_the_outer_update_ops_keep_autograd_versions():
    """The CPU loops write through raw pointers; autograd must still see the in-place change
    (a graph that saved a parameter before the update refuses to run backward after it)."""
    w = torch.randn(4, 3, requires_grad=True)
    y = (w * w).sum()  # saves w
    step = _OuterOnly(torch.optim.Adam([w], lr=0.1))
    step([w], [torch.ones(4, 3)])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


class _OuterOnly:
    """CompiledStep's update alone, on given gradients."""

    def __init__(self, opt):
        self.step = pymeta.model_aware.CompiledStep.__new__(pymeta.model_aware.CompiledStep)
        self.step.optimizer = opt
        self.step.kind = "sgd" if isinstance(opt, torch.optim.SGD) else "adam"
        self.step.max_grad_norm = 0.0

    def __call__(self, params, grads):
        with torch.no_grad():
            self.step._update(self.step.optimizer.param_groups[0], params, grads)


def test_the_outer_update_ops_name_bad_arguments():
    p, g = [torch.zeros(3)], [torch.zeros(3)]
    adam = torch.ops.pymeta.adam_step
    hyper = (1e-3, 0.9, 0.999, 1e-8, 0.0, False, 0.0)
    with pytest.raises(
        RuntimeError, match=r"adam_step: expected as many grads as params \(1\), got 0"
    ):
        adam(p, [], [torch.zeros(3)], [torch.zeros(3)], [torch.tensor(0.0)], *hyper)
    with pytest.raises(
        RuntimeError, match=r"adam_step: exp_avgs\[0\] has shape \[\], expected \[3\]"
    ):
        adam(p, g, [torch.tensor(0.0)], [torch.zeros(3)], [torch.tensor(0.0)], *hyper)
    with pytest.raises(
        RuntimeError, match=r"adam_step: steps\[0\] must be a 0-dim count, got shape \[3\]"
    ):
        adam(p, g, [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)], *hyper)
    with pytest.raises(RuntimeError, match=r"sgd_step: grads\[0\] has shape \[2\], expected \[3\]"):
        torch.ops.pymeta.sgd_step(p, [torch.zeros(2)], p, 0.1, 0.0, 0.0, 0.0, False, False, 0.0)
