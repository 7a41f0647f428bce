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
    learner_kwargs,
    make_batch,
    mlp_recipe,
    network_recipe,
    randomize_learned_lrs,
    settings_recipe,
)
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from parity import lr_lookup, reference_loss, rel_err

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


def assert_parity(got_loss, want_loss, got_params, want_params):
    assert rel_err(got_loss, want_loss) < TOL, (float(got_loss), float(want_loss))
    errors = grad_errors(grads(got_loss, got_params), grads(want_loss, want_params))
    assert max(errors, default=0.0) < TOL, errors


# ----------------------------------------------------------------------------- parity
def check_equals_maml(recipe, s):
    model, batch = built(recipe, s)
    kwargs = learner_kwargs(s)
    aware, agnostic = pymeta.ModelAwareMAML(model, **kwargs), pymeta.MAML(model, **kwargs)
    note(f"core: {aware.core_kind}")
    if s["learn_inner_lr"]:
        randomize_learned_lrs(zip(aware.inner_lrs(), agnostic.inner_lr.as_list()), s["seed"])
    assert_parity(
        aware.meta_loss(batch),
        agnostic.meta_loss(batch),
        list(aware.parameters()),
        list(agnostic.parameters()),
    )


@fuzz(40)
@given(recipe=mlps, s=maml_settings)
def test_mlp_equals_maml(recipe, s):
    check_equals_maml(recipe, s)


@fuzz(25)
@given(recipe=convs, s=maml_settings)
def test_conv_net_equals_maml(recipe, s):
    check_equals_maml(recipe, s)
