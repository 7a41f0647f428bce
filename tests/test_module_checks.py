"""How both MAML variants read the user's module and labels: modules used more than once, tied
parameters, frozen parameters, hooks, subclasses, and class labels (issue 11, defects 2, 4, 5, 9).

Each case is either exact (float64 parity with a plain per-task autograd loop or pymeta.MAML) or
refused up front with a named error, and the user's model is never modified by a call."""

import pytest
import torch
import torch.nn.functional as F
from parity import lr_lookup, randomize_lrs, reference_loss, reference_meta_loss, rel_err
from torch import nn

import pymeta

TOL = 1e-10


def snapshot(model: nn.Module) -> list:
    """Every (module, attribute) parameter slot: name, identity, type, value, requires_grad."""
    return [
        (f"{mod_name}.{attr}", id(p), type(p), p.device, p.detach().clone(), p.requires_grad)
        for mod_name, mod in model.named_modules(remove_duplicate=False)
        for attr, p in mod._parameters.items()
        if p is not None
    ]


def assert_unchanged(model: nn.Module, before: list) -> None:
    after = snapshot(model)
    assert [a[:4] for a in after] == [b[:4] for b in before]
    assert all(torch.equal(a[4], b[4]) and a[5] == b[5] for a, b in zip(after, before))
    assert all(type(p) is nn.Parameter for _, _, p in _slots(model))


def _slots(model):
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                yield mod_name, attr, p


def regression_batch(features=4, outputs=1, tasks=3, k=5, q=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return pymeta.TaskBatch(
        r(tasks, k, features), r(tasks, k, outputs), r(tasks, q, features), r(tasks, q, outputs)
    )


def class_batch(features=4, classes=3, tasks=3, k=6, q=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, features, generator=g, dtype=torch.float64)  # noqa: E731
    y = lambda n: torch.randint(0, classes, (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def image_batch(tasks=2, k=4, q=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return pymeta.TaskBatch(
        r(tasks, k, 1, 6, 6), r(tasks, k, 1), r(tasks, q, 1, 6, 6), r(tasks, q, 1)
    )


def grads(loss, params):
    out = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, out)]


def assert_close_grads(got, want):
    for g, w in zip(got, want):
        assert rel_err(g, w) < TOL or float((g - w).abs().max()) < 1e-14, rel_err(g, w)


# --------------------------------------------------------------- defect 2: pymeta.MAML, sharing
def shared_linear_net():
    """lin used twice: the same nn.Linear object at model.0 and model.2."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 1)).double()


def shared_linear_forward(params, x):
    w, b = params["0.weight"], params["0.bias"]
    h = torch.tanh(F.linear(torch.tanh(F.linear(x, w, b)), w, b))
    return F.linear(h, params["4.weight"], params["4.bias"])


def tied_net():
    """Two distinct Linear modules holding the same weight Parameter (tied weights)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    model[2].weight = model[0].weight
    return model.double()


def tied_forward(params, x):
    w = params["0.weight"]
    h = torch.tanh(F.linear(torch.tanh(F.linear(x, w, params["0.bias"])), w, params["2.bias"]))
    return F.linear(h, params["4.weight"], params["4.bias"])


@pytest.mark.parametrize(
    "net, forward", [(shared_linear_net, shared_linear_forward), (tied_net, tied_forward)]
)
@pytest.mark.parametrize("vectorize", ["auto", False])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_shared_and_tied_parameters_match_a_plain_loop(net, forward, vectorize, first_order):
    model = net()
    before = snapshot(model)
    maml = pymeta.MAML(
        model, inner_lr=0.1, inner_steps=2, first_order=first_order, vectorize=vectorize
    )
    batch = regression_batch()
    params = list(maml.parameters())
    loss = maml.meta_loss(batch)
    assert_unchanged(model, before)  # still the user's Parameters after the call
    ref = reference_meta_loss(
        model, batch, maml.inner_lr.as_list(), 2, first_order, F.mse_loss, forward
    )
    assert rel_err(loss, ref) < TOL
    assert_close_grads(grads(loss, params), grads(ref, params))
    adapted = maml.adapt(batch.support_x, batch.support_y)
    adapted(batch.query_x)
    learner = maml.clone()
    learner.adapt(F.mse_loss(learner(batch.support_x[0]), batch.support_y[0]))
    assert_unchanged(model, before)


def test_maml_failing_call_with_a_shared_module_leaves_the_model_alone():
    model = shared_linear_net()
    before = snapshot(model)
    b = regression_batch()
    wrong = pymeta.TaskBatch(
        b.support_x, b.support_y.expand(-1, -1, 2), b.query_x, b.query_y.expand(-1, -1, 2)
    )
    with pytest.raises(ValueError, match=r"mse expects the model's output shape"):
        pymeta.MAML(model).meta_loss(wrong)
    assert_unchanged(model, before)


# ----------------------------------------------------------- defect 2: ModelAwareMAML, sharing
def shared_act_mlp():
    torch.manual_seed(2)
    act = nn.Tanh()
    return nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 1)).double()


def shared_act_conv():
    torch.manual_seed(3)
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        relu,
        pool,
        nn.Conv2d(3, 3, 3, padding=1),
        relu,
        pool,
        nn.Flatten(),
        nn.Linear(3, 1),
    ).double()


@pytest.mark.parametrize(
    "net, batch, kind",
    [(shared_act_mlp, regression_batch, "mlp"), (shared_act_conv, image_batch, "layered")],
)
def test_model_aware_shared_parameterless_modules_are_exact(net, batch, kind):
    model, batch = net(), batch()
    aware = pymeta.ModelAwareMAML(model, inner_lr=0.1, inner_steps=2)
    assert aware.core_kind == kind
    agnostic = pymeta.MAML(model, inner_lr=0.1, inner_steps=2)
    params = list(model.parameters())
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(grads(la, params), grads(lb, params))


def shared_block_net():
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    return nn.Sequential(block, block, nn.Linear(4, 1))


def shared_bn_net():
    bn = nn.BatchNorm2d(1, affine=False, track_running_stats=False)
    return nn.Sequential(
        nn.Conv2d(1, 1, 3), bn, nn.Conv2d(1, 1, 3), bn, nn.Flatten(), nn.Linear(4, 1)
    )


@pytest.mark.parametrize(
    "net, match",
    [
        (shared_linear_net, r"model.0 and model.2 are the same nn.Linear .* use pymeta.MAML"),
        (shared_block_net, r"model.0.0 and model.1.0 are the same nn.Linear .* use pymeta.MAML"),
        (shared_bn_net, r"model.1 and model.3 are the same nn.BatchNorm2d .* use pymeta.MAML"),
        (tied_net, r"model.0.weight and model.2.weight are the same Parameter .* pymeta.MAML"),
    ],
)
def test_model_aware_refuses_shared_layers_and_tied_parameters(net, match):
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        pymeta.ModelAwareMAML(model)
    assert_unchanged(model, before)


def test_model_aware_failing_call_leaves_the_model_alone():
    model = shared_act_conv()
    aware = pymeta.ModelAwareMAML(model)
    before = snapshot(model)
    b = image_batch()
    wrong = pymeta.TaskBatch(
        b.support_x[..., :1, :1], b.support_y, b.query_x[..., :1, :1], b.query_y
    )
    with pytest.raises(ValueError, match=r"batch.support_x: the model cannot take examples"):
        aware.meta_loss(wrong)
    assert_unchanged(model, before)


# ---------------------------------------------------------------- defect 4: frozen parameters
def frozen_mlp():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    model[2].requires_grad_(False)
    return model.double()


def frozen_conv():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 3),
    ).double()
    model[0].requires_grad_(False)
    model[1].requires_grad_(False)
    return model


def image_class_batch(tasks=2, k=6, q=4, seed=6):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, 1, 6, 6, generator=g, dtype=torch.float64)  # noqa: E731
    y = lambda n: torch.randint(0, 3, (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


@pytest.mark.parametrize(
    "net, batch", [(frozen_mlp, class_batch), (frozen_conv, image_class_batch)]
)
@pytest.mark.parametrize("first_order", [False, True])
def test_model_aware_frozen_layers_behave_like_maml(net, batch, first_order):
    model, batch = net(), batch()
    kwargs = dict(inner_lr=0.3, inner_steps=2, first_order=first_order, loss="cross_entropy")
    aware = pymeta.ModelAwareMAML(model, **kwargs)
    agnostic = pymeta.MAML(model, **kwargs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    la, lb = aware.meta_loss(batch), agnostic.meta_loss(batch)
    assert rel_err(la, lb) < TOL
    assert_close_grads(grads(la, trainable), grads(lb, trainable))
    model.zero_grad(set_to_none=True)
    aware.meta_loss(batch).backward()
    got = [p.grad is not None for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    agnostic.meta_loss(batch).backward()
    assert got == [p.grad is not None for p in model.parameters()]
    assert got == [p.requires_grad for p in model.parameters()]
    pa = aware.adapt(batch.support_x, batch.support_y)(batch.query_x)
    pb = agnostic.adapt(batch.support_x, batch.support_y)(batch.query_x)
    assert rel_err(pa, pb) < TOL


@pytest.mark.parametrize("lr_mode", ["per_layer_step", "per_parameter"])
def test_model_aware_frozen_layers_with_learned_rates_match_autograd(lr_mode):
    """Rates exist for adapted (trainable) layers only; a frozen layer still carries the
    meta-gradient to the layers below it."""
    model, batch = frozen_mlp(), class_batch()
    aware = pymeta.ModelAwareMAML(
        model, inner_lr=0.2, inner_steps=2, loss="cross_entropy", lr_mode=lr_mode,
        learn_inner_lr=True,
    )  # fmt: skip
    assert aware.adapted == [True, False, True]
    randomize_lrs(aware)
    meta = [p for p in aware.parameters() if p.requires_grad]
    loss = aware.meta_loss(batch)
    ref = reference_loss(aware, batch, lr_lookup(aware), F.cross_entropy)
    assert rel_err(loss, ref) < TOL
    assert_close_grads(grads(loss, meta), grads(ref, meta))


def test_model_aware_refuses_partly_frozen_layers_and_frozen_adapt_layers():
    model = frozen_mlp()
    model[0].weight.requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"model.0 \(Linear\): weight has requires_grad=False "
        r"but bias has requires_grad=True.*pymeta.MAML",
    ):
        pymeta.ModelAwareMAML(model)
    model = frozen_mlp()
    with pytest.raises(ValueError, match=r"adapt_layers: model\[2\] \(Linear\) is frozen"):
        pymeta.ModelAwareMAML(model, adapt_layers=[0, 2])
    model[4].requires_grad_(False)
    with pytest.raises(ValueError, match=r"adapt_layers: model\[4\] \(Linear\) is frozen"):
        pymeta.ModelAwareMAML(model, adapt_layers="head")
    model.requires_grad_(False)
    with pytest.raises(
        ValueError,
        match=r"model: expected at least one parameter with "
        r"requires_grad=True",
    ):
        pymeta.ModelAwareMAML(model)


def test_model_aware_refuses_freezing_after_construction():
    model = frozen_mlp()
    aware = pymeta.ModelAwareMAML(model, loss="cross_entropy")
    batch = class_batch()
    aware.meta_loss(batch)
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"model.0 \(Linear\): requires_grad changed"):
        aware.meta_loss(batch)
    with pytest.raises(ValueError, match=r"model.0 \(Linear\): requires_grad changed"):
        aware.adapt(batch.support_x, batch.support_y)


# ------------------------------------------------------------- defect 5: hooks and subclasses
class ScaledIdentity(nn.Identity):
    def forward(self, x):
        return 3 * x


class ShiftedReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) + 1


class MyLinear(nn.Linear):
    pass


class OwnForwardSequential(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def _mlp(*middle):
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 4), *middle, nn.Linear(4, 1)).double()


def _hooked(register):
    model = _mlp(nn.Tanh())
    register(model)
    return model


def _instance_forward():
    model = _mlp(nn.Tanh())
    model[1].forward = lambda x: 2 * torch.tanh(x)
    return model


def _weight_norm():
    model = _mlp(nn.Tanh())
    torch.nn.utils.parametrizations.weight_norm(model[0])
    return model


HOOK_CASES = {
    "forward hook": (
        lambda: _hooked(lambda m: m[1].register_forward_hook(lambda mod, i, o: 2 * o)),
        r"model.1 \(Tanh\): has a forward hook",
    ),
    "forward pre-hook": (
        lambda: _hooked(lambda m: m[0].register_forward_pre_hook(lambda mod, i: (2 * i[0],))),
        r"model.0 \(Linear\): has a forward pre-hook",
    ),
    "hook on the container": (
        lambda: _hooked(lambda m: m.register_forward_hook(lambda mod, i, o: 2 * o)),
        r"model \(Sequential\): has a forward hook",
    ),
    "full backward hook": (
        lambda: _hooked(lambda m: m[1].register_full_backward_hook(lambda mod, gi, go: gi)),
        r"model.1 \(Tanh\): has a backward hook",
    ),
    "Identity subclass": (
        lambda: _mlp(ScaledIdentity(), nn.Tanh()),
        r"model.1 \(ScaledIdentity\): a subclass of nn.Identity",
    ),
    "ReLU subclass": (
        lambda: _mlp(ShiftedReLU()),
        r"model.1 \(ShiftedReLU\): a subclass of nn.ReLU",
    ),
    "Linear subclass": (
        lambda: nn.Sequential(MyLinear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double(),
        r"model.0 \(MyLinear\): a subclass of nn.Linear",
    ),
    "Sequential subclass with its own forward": (
        lambda: nn.Sequential(
            OwnForwardSequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 1)
        ).double(),
        r"node 'mul' \(call_function mul\) in the forward of model.0 \(OwnForwardSequential\)",
    ),
    "top-level Sequential subclass with its own forward": (
        lambda: OwnForwardSequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1)).double(),
        r"node 'mul' \(call_function mul\) in the forward of model \(OwnForwardSequential\)",
    ),
    "forward set on the instance": (
        _instance_forward,
        r"model.1 \(Tanh\): overrides forward",
    ),
    "parametrization": (
        _weight_norm,
        r"model.0 \(ParametrizedLinear\): a subclass of nn.Linear",
    ),
}


@pytest.mark.parametrize("case", list(HOOK_CASES))
def test_model_aware_refuses_what_the_core_cannot_run(case):
    net, match = HOOK_CASES[case]
    model = net()
    with pytest.raises(ValueError, match=match + r".*use pymeta.MAML"):
        pymeta.ModelAwareMAML(model)


@pytest.mark.parametrize(
    "register, match",
    [
        (nn.modules.module.register_module_forward_hook, r"a global forward hook"),
        (
            lambda f: nn.modules.module.register_module_forward_pre_hook(lambda m, i: None),
            r"a global forward pre-hook",
        ),
        (
            lambda f: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None),
            r"a global backward hook",
        ),
    ],
)
def test_model_aware_refuses_global_hooks(register, match):
    handle = register(lambda mod, i, o: None)
    try:
        with pytest.raises(ValueError, match=match + r".*use pymeta.MAML"):
            pymeta.ModelAwareMAML(_mlp(nn.Tanh()))
    finally:
        handle.remove()


def test_model_aware_refuses_hooks_added_after_construction():
    model = shared_act_conv()
    aware = pymeta.ModelAwareMAML(model)
    batch = image_batch()
    aware.meta_loss(batch)
    handle = model[1].register_forward_hook(lambda mod, i, o: 2 * o)
    with pytest.raises(ValueError, match=r"model.1 \(ReLU\): has a forward hook"):
        aware.meta_loss(batch)
    with pytest.raises(ValueError, match=r"model.1 \(ReLU\): has a forward hook"):
        aware.adapt(batch.support_x, batch.support_y)
    handle.remove()
    model[3] = nn.Conv2d(3, 3, 3, padding=1).double()
    with pytest.raises(ValueError, match=r"model: its layers changed since construction"):
        aware.meta_loss(batch)


class PlainSubclass(nn.Sequential):
    """A Sequential subclass that only builds its layers: it runs Sequential's forward."""

    def __init__(self):
        super().__init__(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def test_model_aware_takes_a_sequential_subclass_that_keeps_its_forward():
    torch.manual_seed(8)
    model = PlainSubclass().double()
    batch = regression_batch()
    aware, agnostic = pymeta.ModelAwareMAML(model), pymeta.MAML(model)
    assert rel_err(aware.meta_loss(batch), agnostic.meta_loss(batch)) < TOL


# ------------------------------------------------------------------------- defect 9: labels
def with_labels(batch, support=None, query=None):
    return pymeta.TaskBatch(
        batch.support_x,
        batch.support_y if support is None else support,
        batch.query_x,
        batch.query_y if query is None else query,
    )


def first_label(y, value):
    """Labels 0, 1, 2, 0, ... with the first of every task set to ``value``."""
    out = (torch.arange(y.shape[1]) % 3).expand_as(y).clone()
    out[:, 0] = value
    return out


VARIANTS = {"MAML": pymeta.MAML, "ModelAwareMAML": pymeta.ModelAwareMAML}


# Negative labels are refused before any work (pymeta.MAML learns the class count only from
# the model's output, so its message then says ">= 0"); labels past the last class as soon as
# the output width is known.
NEGATIVE = r"expected class indices (in \[0, 3\)|>= 0), received values in "


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_labels_outside_the_classes_are_refused_by_both_variants(variant):
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    maml = VARIANTS[variant](model, loss="cross_entropy")
    b = class_batch()
    ignored = torch.full_like(b.support_y, -100)
    with pytest.raises(ValueError, match=r"batch.support_y: " + NEGATIVE + r"\[-100, -100\]"):
        maml.meta_loss(with_labels(b, ignored, torch.full_like(b.query_y, -100)))
    with pytest.raises(ValueError, match=r"batch.query_y: " + NEGATIVE + r"\[-1, 2\]"):
        maml.meta_loss(with_labels(b, query=first_label(b.query_y, -1)))
    with pytest.raises(
        ValueError,
        match=r"batch.query_y: expected class indices in \[0, 3\), "
        r"received values in \[0, 3\]",
    ):
        maml.meta_loss(with_labels(b, query=first_label(b.query_y, 3)))
    with pytest.raises(ValueError, match=r"support_y: " + NEGATIVE + r"\[-100, -100\]"):
        maml.adapt(b.support_x, ignored)
    with pytest.raises(ValueError, match=r"support_y: expected class indices in \[0, 3\)"):
        maml.adapt(b.support_x, b.support_y + 3)
