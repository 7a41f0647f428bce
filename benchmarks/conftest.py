"""pytest configuration for the benchmark suite (not part of the default test run: pyproject's
testpaths is ["tests"]). Run with ``.venv/bin/python -m pytest benchmarks/``.

Threads: one by default, so timings measure the implementations rather than the machine's
load; set ``PYMETA_BENCH_THREADS`` (e.g. 2) to override.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# Make the sibling modules (baselines, workloads) importable whatever pytest's import mode.
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

THREADS = int(os.environ.get("PYMETA_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def pytest_report_header(config):
    return f"pymeta benchmarks: torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


@pytest.fixture(scope="session")
def workload_factory():
    """``workload_factory(name, dtype=..., **maml_overrides)`` -> a fresh, seeded Workload."""
    from workloads import make_workload  # importable once the sys.path entry above exists

    return make_workload
