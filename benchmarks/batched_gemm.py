"""The layered core's float32 batched matrix products (csrc/cpu/batched_gemm.h) through oneDNN's
brgemm against at::bmm (BLAS: the MKL sgemm that torch's CPU library carries), on the products
that Winograd convolutions run for ResNet-12.

Two tables, each measured in this one process in rotated rounds (harness.rotated_timings,
medians), float32:

1. Per product shape: the transform-domain products of one Winograd convolution, a batch of
   points x tasks (36 x 2 for F(4x4), 16 x 2 for F(2x2)) of (tiles, C) @ (C, O), as the forward
   and the input gradient read them (both operands row-major), and dM^T V (tiles reduced), as
   the weight gradient reads them (the left operand column-major), through the test op
   ``pymeta::batched_gemm`` with the path on and off (``pymeta._C.set_onednn_gemm``).
2. One second-order meta-step of ``resnet12_step.py``'s workload (widths 32-80-160-320,
   3x32x32, 2 tasks, 5-way, 15 queries per class): ModelAwareMAML with oneDNN's products, with
   BLAS's (``BlasGemmMAML``), and the per-task autograd loop.

Usage::

    .venv/bin/python benchmarks/batched_gemm.py [--threads 1] [--repeats 5]
        [--shots 1 5] [--inner-steps 5] [--skip-shapes] [--skip-steps]
"""

from __future__ import annotations

import torch
from harness import rotated_timings
from resnet12_step import ab_script
from workloads import BlasGemmMAML

import pymeta

# (batch, tiles, C, O, where): ResNet-12's Winograd products at 1-shot support (5 images),
# 5-shot support (25) and query (75) sizes, 2 tasks.
SHAPES = [
    (72, 320, 32, 32, "F(4x4), 32 ch, 32x32, 5 images"),
    (72, 1600, 32, 32, "F(4x4), 32 ch, 32x32, 25 images"),
    (72, 1200, 80, 80, "F(4x4), 80 ch, 16x16, 75 images"),
    (32, 80, 160, 160, "F(2x2), 160 ch, 8x8, 5 images"),
    (72, 300, 160, 160, "F(4x4), 160 ch, 8x8, 75 images"),
    (32, 20, 320, 320, "F(2x2), 320 ch, 4x4, 5 images"),
    (32, 100, 320, 320, "F(2x2), 320 ch, 4x4, 25 images"),
    (72, 75, 320, 320, "F(4x4), 320 ch, 4x4, 75 images"),
]


def shape_table(repeats: int) -> None:
    print(
        "| batch | tiles | C | O | convolution | forward: BLAS ms | oneDNN ms | x faster "
        "| weight gradient: BLAS ms | oneDNN ms | x faster |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    saved = pymeta._C.onednn_gemm()
    try:
        for batch, tiles, c, o, where in SHAPES:
            g = torch.Generator().manual_seed(0)
            v = torch.randn(batch, tiles, c, generator=g)
            u = torch.randn(batch, c, o, generator=g)
            dm_t = torch.randn(batch, tiles, o, generator=g).transpose(1, 2)  # (batch, O, tiles)

            def product(a, b, onednn):
                def run():
                    pymeta._C.set_onednn_gemm(onednn)
                    return torch.ops.pymeta.batched_gemm(a, b)

                return run

            for a, b in ((v, u), (dm_t, v)):
                want = torch.bmm(a.double(), b.double())
                got = product(a, b, True)()
                assert float((got.double() - want).abs().max()) <= 1e-4 * a.shape[2] ** 0.5
            fns = {
                "fwd_blas": product(v, u, False), "fwd_onednn": product(v, u, True),
                "wg_blas": product(dm_t, v, False), "wg_onednn": product(dm_t, v, True),
            }  # fmt: skip
            t = {k: x["median"] * 1e3 for k, x in rotated_timings(fns, repeats, 0.1).items()}
            print(
                f"| {batch} | {tiles} | {c} | {o} | {where} | {t['fwd_blas']:.3f} "
                f"| {t['fwd_onednn']:.3f} | {t['fwd_blas'] / t['fwd_onednn']:.2f}x "
                f"| {t['wg_blas']:.3f} | {t['wg_onednn']:.3f} "
                f"| {t['wg_blas'] / t['wg_onednn']:.2f}x |",
                flush=True,
            )
    finally:
        pymeta._C.set_onednn_gemm(saved)


def main(argv=None) -> None:
    ab_script(
        __doc__,
        argv,
        shape_table,
        ("ModelAwareMAML with BLAS products", BlasGemmMAML),
        ("ModelAwareMAML", pymeta.ModelAwareMAML),
    )


if __name__ == "__main__":
    main()
