"""Property-based fuzzing (hypothesis) over random supported networks, shapes, inner steps, rates
and adaptation specs:

- ModelAwareMAML equals pymeta.MAML in float64 (the loss and every meta-gradient), and with the
  options pymeta.MAML lacks it equals the per-task autograd reference (tests/parity.py);
- invalid combinations raise a ValueError/TypeError whose message names the argument;
- random valid and invalid calls, raw ``torch.ops.pymeta.*`` ops included, never crash the
  interpreter (run in a subprocess, which must exit normally).

Bounded for CI: with the environment variable CI set, every property runs a fixed
(``derandomize``) set of examples. ``PYMETA_FUZZ_SCALE=20`` multiplies the example counts for a
longer local run; without CI the examples are random, so repeated runs explore further.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fuzz_networks import (
    HypothesisChooser,
    build_model,
    conv_recipe,
    grad_errors,
    has_batch_norm,
    invalid_batch_parts,
    invalid_constructor,
    learner_kwargs,
    make_batch,
    mlp_recipe,
    network_recipe,
    options_recipe,
    randomize_learned_lrs,
    reordered,
    settings_recipe,
)
from hypothesis import HealthCheck, Phase, assume, given, note, settings
from hypothesis import strategies as st
from parity import lr_lookup, randomize_lrs, reference_loss, rel_err

import pymeta

TOL = 1e-10
CI = bool(os.environ.get("CI"))
SCALE = float(os.environ.get("PYMETA_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    """Hypothesis settings for ``examples`` examples (times PYMETA_FUZZ_SCALE), fixed in CI."""
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=CI,
        database=None if CI else settings.default.database,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
    )


mlps = st.composite(lambda draw: mlp_recipe(HypothesisChooser(draw)))()
convs = st.composite(lambda draw: conv_recipe(HypothesisChooser(draw)))()
networks = st.composite(lambda draw: network_recipe(HypothesisChooser(draw)))()
maml_settings = st.composite(lambda draw: settings_recipe(HypothesisChooser(draw)))()


def built(recipe, s):
    """(model, batch) for a network recipe and settings; skips recipes that leave no pixels.
    With batch norm, sets have at least 2 examples (PyTorch refuses one value per channel in
    training, and a few values make batch norm too ill-conditioned for a 1e-10 comparison)."""
    out = build_model(recipe)
    assume(out is not None)
    model, example, outputs = out
    k, q = s["k"], s["q"]
    if has_batch_norm(model):
        k, q = max(k, 2), max(q, 2)
    return model, make_batch(example, outputs, s["loss"], s["tasks"], k, q, s["seed"])


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
    model, batch = built(recipe, s)
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
            lambda draw: invalid_batch_parts(HypothesisChooser(draw), example, outputs, loss)
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
    gives a negative return code). The seed is fixed in CI and random otherwise."""
    seed = 0 if CI else int.from_bytes(os.urandom(4), "little")
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
