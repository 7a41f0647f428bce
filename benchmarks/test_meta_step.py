"""Time one meta-step (zero grads, meta-loss, backward) of pymeta.MAML and
pymeta.ModelAwareMAML against the baselines.

Each (workload, order) is one pytest-benchmark group, so the report compares the
implementations side by side; those whose package (learn2learn, higher, torchopt) is not
installed are skipped. Run with::

    .venv/bin/python -m pytest benchmarks/test_meta_step.py
    PYMETA_BENCH_THREADS=2 .venv/bin/python -m pytest benchmarks/test_meta_step.py

``benchmarks/compare.py`` gives a noise-resistant one-table summary of the same matrix.
"""

from __future__ import annotations

import pytest
from workloads import IMPLEMENTATIONS, ORDERS, WORKLOADS, available

# Fixed rounds rather than pytest-benchmark's calibration keep the whole file at a few minutes
# on one thread. Sinusoid steps take milliseconds, so each round runs several to beat timer and
# scheduling noise; 5-step sinusoid and wide-mlp steps take up to 0.1 and 0.5 s (the slowest
# library baselines), so fewer rounds and iterations are enough.
PEDANTIC = {
    "sinusoid": {"rounds": 40, "iterations": 5, "warmup_rounds": 2},
    "sinusoid-5": {"rounds": 20, "iterations": 2, "warmup_rounds": 2},
    "wide-mlp": {"rounds": 15, "iterations": 1, "warmup_rounds": 2},
}


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("workload_name", WORKLOADS)
def test_meta_step(benchmark, workload_factory, workload_name, order, implementation):
    if not available(implementation):
        pytest.skip(f"{implementation} is not installed")
    workload = workload_factory(workload_name)
    maml = workload.build(implementation, order)
    benchmark.group = f"{workload_name} / {order} order"
    benchmark.extra_info.update(workload=workload_name, order=order, implementation=implementation)
    loss = benchmark.pedantic(workload.meta_step, args=(maml,), **PEDANTIC[workload_name])
    assert loss.isfinite()
