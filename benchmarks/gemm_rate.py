"""Single-thread float32 GEMM rate of torch (its BLAS) on the per-task matrix shapes of the
benchmark workloads: the ceiling the arithmetic-bound arguments in docs/model-aware.md use.

Usage::

    .venv/bin/python benchmarks/gemm_rate.py [--threads N]
"""

from __future__ import annotations

import argparse
import sys

import torch
from harness import time_calls

# (m, k, n, transposed A): C (m x n) = A (m x k) @ B (k x n).
SHAPES = [
    (10, 40, 40, False),  # sinusoid: 10 support points through the 40x40 layer
    (40, 10, 40, True),  # its weight gradient
    (25, 256, 256, False),  # wide-mlp: 25 support rows through the 256x256 layer
    (25, 64, 256, False),
    (256, 25, 256, True),
    (75, 256, 256, False),  # wide-mlp query rows
    (256, 256, 256, False),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32 torch.mm\n")
    print("| m | k | n | A transposed | us per call | GFLOP/s |")
    print("| ---: | ---: | ---: | --- | ---: | ---: |")
    for m, k, n, ta in SHAPES:
        a = torch.randn(k, m).t() if ta else torch.randn(m, k)
        b, c = torch.randn(k, n), torch.empty(m, n)
        call = lambda a=a, b=b, c=c: torch.mm(a, b, out=c)  # noqa: E731
        time_calls(call, 50)  # warm-up
        calls = max(50, int(2e8 / (2 * m * k * n)))
        seconds = min(time_calls(call, calls) for _ in range(5))
        rate = 2 * m * k * n / seconds / 1e9
        print(f"| {m} | {k} | {n} | {ta} | {seconds * 1e6:.1f} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
