"""Time the omniglot-shaped meta-step (conv4, 5-way 1-shot, 15 queries per class, meta-batch 8,
one inner step) of every implementation that runs convolutional networks, as pytest-benchmark
groups per order, so the report puts ModelAwareMAML beside the per-task loop it must beat by 2×.

    .venv/bin/python -m pytest benchmarks/test_omniglot_step.py

``benchmarks/omniglot_step.py`` gives the same matrix as one table with ratios, peak memory and
the float64 gradient check.
"""

from __future__ import annotations

import pytest
import torch
from omniglot_step import CONV_IMPLEMENTATIONS, build, make_batch, meta_step
from workloads import ORDERS, available

import pymeta

# Each step takes 0.2-2.5 s on one thread: a few rounds of one iteration are enough.
PEDANTIC = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}


@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_omniglot_step(benchmark, order, implementation):
    if not available(implementation):
        pytest.skip(f"{implementation} is not installed")
    torch.manual_seed(0)
    model = pymeta.models.conv4(5)
    batch = make_batch(8, 5, 1, 15, torch.float32)
    maml = build(implementation, model, order)
    benchmark.group = f"omniglot-shaped / {order} order"
    benchmark.extra_info.update(order=order, implementation=implementation)
    benchmark.pedantic(meta_step, args=(maml, model, batch), **PEDANTIC)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
