"""Property-based fuzzing (hypothesis) over random supported networks, shapes, inner steps, rates
and adaptation specs:

- ModelAwareMAML equals pymeta.MAML in float64 (the loss and every meta-gradient), and with the
  options pymeta.MAML lacks it equals the per-task autograd reference (tests/parity.py);
- invalid combinations raise a ValueError/TypeError whose message names the argument;
- random valid and invalid calls, raw ``torch.ops.pymeta.*`` ops included, never crash the
  interpreter (run in a subprocess, which must exit normally);
- issue 11's defects as properties: shared modules and tied parameters (exact or refused, the
  model untouched), hooks and subclasses (refused, naming the module), frozen parameters,
  non-finite weights, and raw ops with a tensor on another device (refused, naming it).

Bounded and repeatable: by default every property runs a fixed (``derandomize``) set of
examples, so the README's test command gives the same result on every machine.
``PYMETA_FUZZ_RANDOM=1`` draws random examples (and keeps hypothesis' example database), so
repeated runs explore further, and ``PYMETA_FUZZ_SCALE=20`` multiplies the example counts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fuzz_networks import (
    HypothesisChooser,
    add_hook,
    build_model,
    conv_recipe,
    grad_errors,
    has_batch_norm,
    invalid_batch_parts,
    invalid_constructor,
    leaf_forward,
    learner_kwargs,
    leaves,
    make_batch,
    mlp_recipe,
    network_recipe,
    options_recipe,
    randomize_learned_lrs,
    reordered,
    runs,
    settings_recipe,
    share_parameterless,
    share_parametric,
    subclass_in_place,
)
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st
from parity import lr_lookup, randomize_lrs, reference_loss, reference_meta_loss, rel_err
from test_module_checks import assert_unchanged, snapshot
from test_op_devices import _at, _expected_message, _positions, _with
from torch import nn

import pymeta
from pymeta.model_aware.module_checks import CORE_LAYER_TYPES

TOL = 1e-10
RANDOM = bool(os.environ.get("PYMETA_FUZZ_RANDOM"))
SCALE = float(os.environ.get("PYMETA_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    """Hypothesis settings for ``examples`` examples (times PYMETA_FUZZ_SCALE), fixed unless
    PYMETA_FUZZ_RANDOM is set."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=not RANDOM,
        database=settings.default.database if RANDOM else None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    )


mlps = st.composite(lambda draw: mlp_recipe(HypothesisChooser(draw)))()
convs = st.composite(lambda draw: conv_recipe(HypothesisChooser(draw)))()
networks = st.composite(lambda draw: network_recipe(HypothesisChooser(draw)))()
maml_settings = st.composite(lambda draw: settings_recipe(HypothesisChooser(draw)))()


def built(recipe, s):
    """(model, batch) for a network recipe and settings; skips recipes that leave no pixels.
    With batch norm, sets have at least 3 examples: PyTorch refuses one value per channel in
    training, and with two, reversing the examples (the rounding floor of ``assert_parity``)
    changes no sum, so it cannot measure the rounding that batch norm over so few values
    amplifies (measured: 1.0014e-10 against a floor of 0). Batches that collapse a batch norm
    channel are skipped (``collapses_batch_norm``)."""
    out = build_model(recipe)
    assume(out is not None)
    model, example, outputs = out
    k, q = s["k"], s["q"]
    if has_batch_norm(model):  # see the docstring: 3, so that reversing measures rounding
        k, q = max(k, 3), max(q, 3)
    batch = make_batch(example, outputs, s["loss"], s["tasks"], k, q, s["seed"])
    assume(not collapses_batch_norm(model, batch))
    return model, batch


def collapses_batch_norm(model, batch) -> bool:
    """Whether some batch norm layer sees a channel whose values in a set (nearly) coincide:
    e.g. a ReLU zeroed them, or a 1x1 conv of a padded border. Its output is then beta plus
    rounding noise scaled by up to 1/sqrt(eps), a following ReLU decides on the sign of that
    noise, and two correct programs differ by O(1): a tie, not a bug (found by this fuzzer:
    BatchNorm1d on two identical rows). Spreads below 1e-3 (sqrt(eps) is 3e-3) also amplify
    rounding past the 1e-10 bound, which reversing a pair of examples cannot measure."""
    with torch.no_grad():
        for x in (*batch.support_x, *batch.query_x):
            h = x
            for _, layer in leaves(model):
                if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                    per_channel = h.transpose(0, 1).reshape(h.shape[1], -1)
                    spread = per_channel.amax(1) - per_channel.amin(1)
                    if bool((spread <= 1e-3 * (1 + per_channel.abs().amax(1))).any()):
                        return True
                h = layer(h)
    return False


def grads(loss, params):
    got = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]


def assert_parity(got, want, want_reordered):
    """got, want, want_reordered: (loss, params) pairs; the last is the reference on the batch
    with its examples reversed. Each gradient must match to TOL or, where the problem's
    conditioning amplifies rounding beyond that (batch norm over a few values), to 10 times
    the reference's own disagreement with itself under that reordering."""
    (got_loss, got_params), (want_loss, want_params) = got, want
    floor_loss = rel_err(want_reordered[0], want_loss)
    assert rel_err(got_loss, want_loss) <= max(TOL, 10 * floor_loss), (
        float(got_loss),
        float(want_loss),
        floor_loss,
    )
    want_grads = grads(want_loss, want_params)
    errors = grad_errors(grads(got_loss, got_params), want_grads)
    floors = grad_errors(grads(*want_reordered), want_grads)
    bad = [(i, e, f) for i, (e, f) in enumerate(zip(errors, floors)) if e > max(TOL, 10 * f)]
    assert not bad, f"(param index, error, reordering floor): {bad}"


# ----------------------------------------------------------------------------- parity
def check_equals_maml(recipe, s):
    check_model_equals_maml(*built(recipe, s), s)


def check_model_equals_maml(model, batch, s):
    kwargs = learner_kwargs(s)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    note(f"core: {aware.core_kind}")
    if s["learn_inner_lr"]:
        randomize_learned_lrs(zip(aware.inner_lrs(), agnostic.inner_lr.as_list()), s["seed"])
    params = list(agnostic.parameters())
    assert_parity(
        (aware.meta_loss(batch), list(aware.parameters())),
        (agnostic.meta_loss(batch), params),
        (agnostic.meta_loss(reordered(batch)), params),
    )


@fuzz(40)
@given(recipe=mlps, s=maml_settings)
def test_mlp_equals_maml(recipe, s):
    check_equals_maml(recipe, s)


@fuzz(25)
@given(recipe=convs, s=maml_settings)
def test_conv_net_equals_maml(recipe, s):
    check_equals_maml(recipe, s)


@fuzz(40)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_options_equal_autograd_reference(recipe, s, data):
    """adapt_layers, lr_mode, learned rates, multi_step_loss and per_step_bn against the
    per-task autograd loop of tests/parity.py."""
    model, batch = built(recipe, s)
    steps = s["inner_steps"]
    options = data.draw(
        st.composite(lambda draw: options_recipe(HypothesisChooser(draw), model, steps))(),
        label="options",
    )
    maml = pymeta.ModelAwareMAML(
        model, inner_lr=s["inner_lr"], inner_steps=s["inner_steps"], first_order=s["first_order"],
        loss=s["loss"], learn_inner_lr=True, **options,
    )  # fmt: skip
    randomize_lrs(maml, seed=s["seed"])
    g = torch.Generator().manual_seed(s["seed"])
    with torch.no_grad():  # distinct per-step batch norm rows, so a wrong row would show
        for p in getattr(maml, "bn_steps", []):
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    loss_fn = F.mse_loss if s["loss"] == "mse" else F.cross_entropy
    params = list(maml.parameters())
    want = reference_loss(maml, batch, lr_lookup(maml), loss_fn)
    assert_parity(
        (maml.meta_loss(batch), params),
        (want, params),
        (reference_loss(maml, reordered(batch), lr_lookup(maml), loss_fn), params),
    )
    # adapt() runs the same inner loop: its query loss is the meta-loss's last-step term.
    weight = maml.step_weights[-1]
    if weight:
        adapted = maml.adapt(batch.support_x, batch.support_y, batched=True)
        pred = adapted(batch.query_x)
        last = torch.stack(
            [loss_fn(pred[t], batch.query_y[t]) for t in range(batch.num_tasks)]
        ).mean()
        assert rel_err(weight * last, want_last_step(maml, batch, loss_fn)) < TOL


def want_last_step(maml, batch, loss_fn):
    """The reference's weighted query loss after the last step alone."""
    weights = maml.step_weights
    maml.step_weights = [0.0] * (len(weights) - 1) + [weights[-1]]
    try:
        return reference_loss(maml, batch, lr_lookup(maml), loss_fn).detach()
    finally:
        maml.step_weights = weights


# Properties of issue 11's defects 4 (frozen parameters) and 3 (non-finite weights).
@fuzz(20)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_frozen_parameters_equal_maml(recipe, s, data):
    """Parameters with requires_grad=False stay fixed in the inner loop in both variants, or
    ModelAwareMAML refuses a layer frozen in part (it adapts whole layers), naming it."""
    model, batch = built(recipe, s)
    params = list(model.parameters())
    frozen = data.draw(st.lists(st.booleans(), min_size=len(params), max_size=len(params)))
    assume(not all(frozen))
    for p, f in zip(params, frozen):
        p.requires_grad_(not f)
    kwargs = {**learner_kwargs(s), "learn_inner_lr": False}
    try:
        aware = pymeta.ModelAwareMAML(model, **kwargs)
    except ValueError as err:
        assert "requires_grad=False" in str(err) and "model." in str(err), str(err)
        return
    agnostic = pymeta.MAML(model, **kwargs)
    trainable = [p for p in params if p.requires_grad]
    assert_parity(
        (aware.meta_loss(batch), trainable),
        (agnostic.meta_loss(batch), trainable),
        (agnostic.meta_loss(reordered(batch)), trainable),
    )


@fuzz(20)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_non_finite_weights_propagate_like_maml(recipe, s, data):
    """A NaN or infinite weight gives a non-finite meta-loss in ModelAwareMAML whenever it does
    in pymeta.MAML (or ModelAwareMAML refuses the call)."""
    model, batch = built(recipe, s)
    params = list(model.parameters())
    i = data.draw(st.integers(0, len(params) - 1), label="param")
    j = data.draw(st.integers(0, params[i].numel() - 1), label="element")
    with torch.no_grad():
        params[i].view(-1)[j] = data.draw(st.sampled_from([float("nan"), float("inf")]))
    kwargs = learner_kwargs(s)
    want = pymeta.MAML(model, **kwargs).meta_loss(batch)
    assume(not torch.isfinite(want))
    try:
        got = pymeta.ModelAwareMAML(model, **kwargs).meta_loss(batch)
    except (ValueError, TypeError):
        return
    assert not torch.isfinite(got), float(got)


# Properties of issue 11's defect 2 (modules used more than once, tied parameters).
def drawn(data, sampler, *args, label):
    """data.draw of a fuzz_networks sampler ``sampler(chooser, *args)``."""
    return data.draw(st.composite(lambda draw: sampler(HypothesisChooser(draw), *args))(), label)


@fuzz(60)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_shared_parameterless_modules_equal_maml(recipe, s, data):
    """One activation, pooling or Flatten object at two places: ModelAwareMAML runs it at both
    (it equals pymeta.MAML), wherever a copy of it would be supported."""
    model, batch = built(recipe, s)
    pair = drawn(data, share_parameterless, model, batch.support_x.shape[2:], label="shared")
    assume(pair is not None)
    shared, twin = pair
    note(f"shared: {shared}")
    layers = [m for _, m in leaves(shared)]
    event(f"shared {next(type(m).__name__ for m in layers if layers.count(m) > 1)}")
    try:
        pymeta.ModelAwareMAML(twin, **learner_kwargs(s))
    except ValueError:  # not a supported place for this layer: sharing must not change that
        with pytest.raises(ValueError):
            pymeta.ModelAwareMAML(shared, **learner_kwargs(s))
        assume(False)
    check_model_equals_maml(shared, batch, s)


@fuzz(60)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_shared_layers_and_tied_parameters_are_refused_and_exact_in_maml(recipe, s, data):
    """A Linear, Conv2d or batch norm object at two places, or one Parameter in two layers:
    ModelAwareMAML refuses it at construction, naming both places and pointing to
    pymeta.MAML, and leaves the model as it was (every parameter slot: the same object, still
    an nn.Parameter, the same values). pymeta.MAML's meta-gradient equals a per-task autograd
    loop with a hand-written forward, and it too leaves the model alone."""
    out = build_model(recipe)
    assume(out is not None)
    model, example, outputs = out
    model, first, second, attr = drawn(data, share_parametric, model, example, label="shared")
    note(f"model: {model}")
    before = snapshot(model)
    if attr:
        where = rf"model\.{first}\.{attr} and model\.{second}\.{attr} are the same Parameter"
    else:
        where = rf"model\.{first} and model\.{second} are the same nn\.\w+ \(one module used"
    with pytest.raises(ValueError, match=where + r".*use pymeta\.MAML"):
        pymeta.ModelAwareMAML(model, **learner_kwargs(s))
    assert_unchanged(model, before)
    if not runs(model, example) or s["tasks"] * s["inner_steps"] > 4:
        return  # the loop below is slow: small problems only
    event("pymeta.MAML against the loop: " + ("tied " + attr if attr else "shared layer"))
    k, q = (max(s["k"], 3), max(s["q"], 3)) if has_batch_norm(model) else (s["k"], s["q"])
    with torch.no_grad():  # a layer inserted again can change the output's width
        outputs = model(torch.zeros(3, *example, dtype=torch.float64)).shape[-1]
    batch = make_batch(example, outputs, s["loss"], s["tasks"], k, q, s["seed"])
    maml = pymeta.MAML(model, **learner_kwargs(s))
    if s["learn_inner_lr"]:
        randomize_learned_lrs(((lr, lr) for lr in maml.inner_lr.as_list()), s["seed"])
    params = list(maml.parameters())

    def loop(b):
        lrs, steps, loss_fn = maml.inner_lr.as_list(), s["inner_steps"], LOSSES[s["loss"]]
        return reference_meta_loss(
            model, b, lrs, steps, s["first_order"], loss_fn, leaf_forward(model)
        )

    assert_parity(
        (maml.meta_loss(batch), params), (loop(batch), params), (loop(reordered(batch)), params)
    )
    assert_unchanged(model, before)


LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


# Properties of issue 11's defect 5 (hooks and subclasses).
def module_pattern(name: str) -> str:
    """The start of an error about the module with this qualified name: 'model.1.0 (Tanh)'."""
    return rf"model{re.escape('.' + name) if name else ''} \(\w+\)"


@fuzz(80)
@given(recipe=networks, data=st.data())
def test_hooks_and_subclasses_are_refused(recipe, data):
    """A forward, forward pre-, backward or backward pre-hook (even a no-op one) on a random
    module, or a random layer turned into a subclass with its own forward (computing the
    same): ModelAwareMAML refuses it, naming the module and pointing to pymeta.MAML, because
    its core would not run that code. A container (the model or a nested Sequential) turned
    into such a subclass is read through its forward by torch.fx, and runs exactly."""
    out = build_model(recipe)
    assume(out is not None)
    model, example, outputs = out
    if data.draw(st.booleans(), label="subclass"):
        name = drawn(data, subclass_in_place, model, label="subclass of")
        if not isinstance(model.get_submodule(name), CORE_LAYER_TYPES):
            event("container subclass: read through its forward")
            batch = make_batch(example, outputs, "mse", 2, 3, 3, 0)
            aware, agnostic = pymeta.ModelAwareMAML(model), pymeta.MAML(model)
            assert rel_err(aware.meta_loss(batch), agnostic.meta_loss(batch)) < 1e-10
            return
        what = r"a subclass of nn\.\w+"
    else:
        name, kind = drawn(data, add_hook, model, label="hook")
        what = rf"has a {kind}"
    match = module_pattern(name) + ": " + what + r".*use pymeta\.MAML"
    with pytest.raises((ValueError, TypeError), match=match):
        pymeta.ModelAwareMAML(model)


@fuzz(30)
@given(recipe=networks, s=maml_settings, data=st.data())
def test_hooks_added_after_construction_are_refused(recipe, s, data):
    model, batch = built(recipe, s)
    maml = pymeta.ModelAwareMAML(model, **learner_kwargs(s))
    maml.meta_loss(batch)
    name, kind = drawn(data, add_hook, model, label="hook")
    with pytest.raises(ValueError, match=module_pattern(name) + f": has a {kind}"):
        maml.meta_loss(batch)


# Properties of issue 11's defect 6 (raw ops with tensors on two devices).
def sgd_update_args(data, backward: bool) -> list:
    """Valid arguments of sgd_update (params, grads, lrs) or sgd_update_backward (grads,
    grad_outputs, lrs, compute_lr_grad): 1-3 tensors (T, ...) of random shapes, and one shared
    scalar rate or one rate per tensor (a scalar or one per element of an example)."""
    tasks = data.draw(st.integers(1, 3), label="tasks")
    dims = st.lists(st.integers(1, 3), max_size=2)
    shapes = data.draw(st.lists(dims, min_size=1, max_size=3), label="shapes")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    g = torch.Generator().manual_seed(0)

    def tensors():
        return [torch.randn(tasks, *shape, generator=g, dtype=dtype) for shape in shapes]

    if data.draw(st.booleans(), label="shared rate"):
        lrs = [torch.tensor(0.1, dtype=dtype)]
    else:
        per_element = st.booleans()
        lrs = [
            torch.full(shape if data.draw(per_element) else (), 0.1, dtype=dtype)
            for shape in shapes
        ]
    args = [tensors(), tensors(), lrs]
    return [*args, data.draw(st.booleans())] if backward else args


@fuzz(80)
@given(
    recipe=networks,
    s=maml_settings,
    op_name=st.sampled_from(["sgd_update", "sgd_update_backward", "maml_loss", "adapt"]),
    data=st.data(),
)
def test_raw_ops_refuse_a_tensor_on_another_device(recipe, s, op_name, data):
    """A valid call of a torch.ops.pymeta op (the loss and adapt ops of the network's core, with
    a ModelAwareMAML's arguments) with one random tensor argument, or list element, moved to
    the meta device: a ValueError naming the op and that argument, through the dispatcher or
    straight into the CPU kernel; never the fake kernel's uninitialised outputs."""
    if op_name.startswith("sgd"):
        args = sgd_update_args(data, backward=op_name.endswith("backward"))
    else:
        dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
        out = build_model(recipe, dtype)
        assume(out is not None)
        model, example, outputs = out
        if has_batch_norm(model):
            s = {**s, "k": max(s["k"], 2), "q": max(s["q"], 2)}
        batch = make_batch(example, outputs, s["loss"], s["tasks"], s["k"], s["q"], s["seed"],
                           dtype)  # fmt: skip
        lr_mode = data.draw(st.sampled_from(["scalar", "per_layer_step", "per_parameter"]))
        maml = pymeta.ModelAwareMAML(
            model, **learner_kwargs(s), lr_mode=lr_mode if s["learn_inner_lr"] else "scalar"
        )
        core_args = maml._core_args(  # the inputs as meta_loss passes them (flattened)
            maml._inputs("x", batch.support_x), maml._targets("y", batch.support_y),
            maml._inputs("x", batch.query_x), maml._targets("y", batch.query_y),
            params=[p.detach() for p in maml._params()],
            lrs=[lr.detach() for lr in maml.inner_lrs()],
        )  # fmt: skip
        op_name = f"net_{op_name}"
        if op_name.endswith("maml_loss"):
            args = [*core_args, *data.draw(st.tuples(st.booleans(), st.booleans()))]
        else:  # adapt: params, lrs, support_x, support_y, layers, layer_args, steps, ...
            args = [*core_args[:4], *core_args[6:8], s["inner_steps"], *core_args[9:11]]
    op = getattr(torch.ops.pymeta, op_name)
    note(f"op: {op_name}")
    op(*args)  # valid as it is
    positions = _positions(op, args)
    label, i, k = data.draw(st.sampled_from(positions), label="moved")
    mixed = _with(args, i, k, _at(args, i, k).to("meta"))
    match = _expected_message(op_name, positions, label, "meta", "cpu")
    with pytest.raises(ValueError, match=match):
        if data.draw(st.booleans(), label="into the CPU kernel"):
            op.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *mixed)
        else:
            op(*mixed)


# ----------------------------------------------------------------------------- invalid input
def assert_named_error(call, argument: str):
    """call() raises a ValueError or TypeError whose message names ``argument``."""
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert argument in str(info.value), f"{argument!r} not named in: {info.value}"


@fuzz(60)
@given(recipe=networks, data=st.data())
def test_invalid_constructor_arguments_are_named(recipe, data):
    out = build_model(recipe)
    assume(out is not None)
    model = out[0]
    name, bad = data.draw(
        st.composite(lambda draw: invalid_constructor(HypothesisChooser(draw), model))(),
        label="invalid",
    )
    if name == "model":
        assert_named_error(lambda: pymeta.ModelAwareMAML(bad), "model")
    else:
        assert_named_error(lambda: pymeta.ModelAwareMAML(model, **bad), name)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


@fuzz(60)
@given(recipe=networks, loss=st.sampled_from(["mse", "cross_entropy"]), data=st.data())
def test_invalid_batches_are_named(recipe, loss, data):
    """A batch with one defect (task counts, set sizes, empty sets, dtypes, NaN/inf, shapes,
    class labels) is refused by TaskBatch or by meta_loss and adapt, naming the field."""
    out = build_model(recipe)
    assume(out is not None)
    model, example, outputs = out
    field, parts = data.draw(
        st.composite(
            lambda draw: invalid_batch_parts(
                HypothesisChooser(draw),
                example,
                outputs,
                loss,
                min_set=2 if has_batch_norm(model) else 1,
            )  # fmt: skip
        )(),
        label="invalid",
    )
    maml = pymeta.ModelAwareMAML(model, loss=loss)
    note(f"core: {maml.core_kind}")
    try:
        batch = pymeta.TaskBatch(**parts)
    except (ValueError, TypeError) as err:
        assert field in str(err), f"{field!r} not named in: {err}"
        return
    assert_named_error(lambda: maml.meta_loss(batch), f"batch.{field}")
    if field.startswith("support"):
        assert_named_error(
            lambda: maml.adapt(batch.support_x, batch.support_y, batched=True), field
        )


# ----------------------------------------------------------------------------- no crashes
def test_random_calls_do_not_crash_the_interpreter():
    """Random valid and invalid calls, raw ``torch.ops.pymeta`` ops with broken arguments
    included, for a few seconds in a subprocess: it must exit normally (a segfault or abort
    gives a negative return code). The seed is fixed unless PYMETA_FUZZ_RANDOM is set."""
    seed = int.from_bytes(os.urandom(4), "little") if RANDOM else 0
    seconds = 3.0 * SCALE
    script = Path(__file__).with_name("fuzz_networks.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", str(script), str(seed), str(seconds)],
        capture_output=True, text=True, timeout=120 + 2 * seconds, env=env, cwd=script.parent,
    )  # fmt: skip
    tail = "\n".join(proc.stdout.splitlines()[-3:] + proc.stderr.splitlines()[-30:])
    assert proc.returncode == 0, f"seed {seed}: exit code {proc.returncode}\n{tail}"
    assert "calls: " in proc.stdout, tail
