"""The baselines and pymeta.MAML compute the same meta-loss and meta-gradients (float64).

A timing comparison is only meaningful if all implementations compute the same thing.
Run with ``.venv/bin/python -m pytest benchmarks/test_baselines_agree.py``.
"""

from __future__ import annotations

import pytest
import torch
from workloads import IMPLEMENTATIONS, ORDERS, WORKLOADS


def _assert_close(actual, expected, what: str, **tolerances):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}", **tolerances)


def _loss_and_grads(workload, implementation, order):
    loss = workload.meta_step(workload.build(implementation, order))
    return loss.detach(), [p.grad.clone() for p in workload.model.parameters()]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "workload_name,overrides",
    [
        ("sinusoid", {}),
        ("sinusoid", {"inner_steps": 3}),  # several steps: second-order terms compound
        ("wide-mlp", {"inner_steps": 2}),  # 2 steps instead of 5 keeps the float64 loop quick
    ],
)
def test_same_meta_loss_and_meta_gradients(workload_factory, workload_name, overrides, order):
    workload = workload_factory(workload_name, dtype=torch.float64, **overrides)
    ref_loss, ref_grads = _loss_and_grads(workload, "per_task_loop", order)
    assert all(g.abs().sum() > 0 for g in ref_grads)  # the comparison is not vacuous
    for implementation in IMPLEMENTATIONS:
        loss, grads = _loss_and_grads(workload, implementation, order)
        _assert_close(loss, ref_loss, f"{implementation} meta-loss", rtol=1e-10, atol=1e-12)
        for (name, _), g, ref in zip(
            workload.model.named_parameters(), grads, ref_grads, strict=True
        ):
            _assert_close(
                g, ref, f"{implementation} meta-gradient of {name}", rtol=1e-9, atol=1e-12
            )


@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_first_and_second_order_differ(workload_factory, workload_name):
    # Guards against a baseline silently dropping (or keeping) second-order terms.
    workload = workload_factory(workload_name, dtype=torch.float64)
    for implementation in IMPLEMENTATIONS:
        _, second = _loss_and_grads(workload, implementation, "second")
        _, first = _loss_and_grads(workload, implementation, "first")
        same = all(torch.allclose(a, b) for a, b in zip(second, first, strict=True))
        assert not same, implementation
