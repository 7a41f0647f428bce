"""All implementations compute the same meta-loss and meta-gradients (float64), and the
pymeta adaptations agree with a plain autograd loop.

A timing comparison is only meaningful if all implementations compute the same thing.
Run with ``.venv/bin/python -m pytest benchmarks/test_baselines_agree.py``; implementations
whose package (learn2learn, higher, torchopt) is not installed are skipped.
"""

from __future__ import annotations

import pytest
import torch
from adapt_speed import ADAPTERS
from workloads import IMPLEMENTATIONS, ORDERS, WORKLOADS, available

# In float64 the implementations differ only by summation order: relative error < 1e-10.
# atol only keeps elements that are zero up to rounding (|x| ~ 1e-17) from failing rtol.
TOLERANCES = {"rtol": 1e-10, "atol": 1e-14}


def _assert_close(actual, expected, what: str):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **TOLERANCES)


def _skip_if_missing(implementation: str) -> None:
    if not available(implementation):
        pytest.skip(f"{implementation} is not installed")


def _loss_and_grads(workload, implementation, order):
    loss = workload.meta_step(workload.build(implementation, order))
    return loss.detach(), [p.grad.clone() for p in workload.model.parameters()]


@pytest.mark.parametrize("implementation", [n for n in IMPLEMENTATIONS if n != "per_task_loop"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "workload_name,overrides",
    [
        ("sinusoid", {}),
        ("sinusoid", {"inner_steps": 3}),
        ("sinusoid-5", {}),  # several steps: second-order terms compound
        ("wide-mlp", {"inner_steps": 2}),  # 2 steps instead of 5 keeps the float64 loop quick
    ],
)
def test_same_meta_loss_and_meta_gradients(
    workload_factory, workload_name, overrides, order, implementation
):
    _skip_if_missing(implementation)
    workload = workload_factory(workload_name, dtype=torch.float64, **overrides)
    ref_loss, ref_grads = _loss_and_grads(workload, "per_task_loop", order)
    assert all(g.abs().sum() > 0 for g in ref_grads)  # the comparison is not vacuous
    loss, grads = _loss_and_grads(workload, implementation, order)
    _assert_close(loss, ref_loss, f"{implementation} meta-loss")
    for (name, _), g, ref in zip(workload.model.named_parameters(), grads, ref_grads, strict=True):
        _assert_close(g, ref, f"{implementation} meta-gradient of {name}")


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_first_and_second_order_differ(workload_factory, workload_name, implementation):
    # Guards against an implementation silently dropping (or keeping) second-order terms.
    _skip_if_missing(implementation)
    workload = workload_factory(workload_name, dtype=torch.float64)
    _, second = _loss_and_grads(workload, implementation, "second")
    _, first = _loss_and_grads(workload, implementation, "first")
    assert not all(torch.allclose(a, b) for a, b in zip(second, first, strict=True))


@pytest.mark.parametrize("adapter", [n for n in ADAPTERS if n != "autograd_loop"])
@pytest.mark.parametrize("workload_name,steps", [("sinusoid", 10), ("wide-mlp", 5)])
def test_same_adaptation(workload_factory, workload_name, steps, adapter):
    # adapt_speed.py times these; the adapted models must predict the same query outputs.
    workload = workload_factory(workload_name, dtype=torch.float64)
    ref = ADAPTERS["autograd_loop"](workload, steps)()(workload.batch.query_x)
    out = ADAPTERS[adapter](workload, steps)()(workload.batch.query_x)
    _assert_close(out, ref, f"{adapter} adapted predictions")
