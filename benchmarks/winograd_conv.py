"""Winograd convolutions, F(2x2, 3x3) and F(4x4, 3x3), the model-aware core's fourth CPU fast
path (``winograd_block_by_shape`` in csrc/cpu/winograd.cpp, called from csrc/net/layers.cpp),
against oneDNN's direct convolutions.

Two tables, each measured in this one process in rotated rounds (harness.rotated_timings,
medians), float32, channels-last:

1. Per convolution shape (3x3 kernels, stride 1, padding 1): all of one convolution layer's
   rules that a second-order meta-step runs (forward, input and weight gradients, and the
   R-operator's forward and backward: ``pymeta::net_layer_rules``) by oneDNN, by F(2x2) and by
   F(4x4) (each forced: ``pymeta._C.set_winograd_blocks``), for one task, and the block the
   core's shape rule picks. The shapes are ResNet-12's (``resnet12_step.py``: support N = 5 or
   25, queries N = 75) and conv4's (64 channels at 14x14, 7x7 and 3x3). The rule's thresholds
   come from this table.
2. One second-order meta-step of ``resnet12_step.py``'s workload (widths 32-80-160-320, 3x32x32,
   2 tasks, 5-way, 15 queries per class): ModelAwareMAML with the path, without it
   (``OnednnConvolutionsMAML``), and the per-task autograd loop.

Usage::

    .venv/bin/python benchmarks/winograd_conv.py [--threads 1] [--repeats 5]
        [--shots 1 5] [--inner-steps 5] [--skip-shapes] [--skip-steps]
"""

from __future__ import annotations

import torch
from harness import rotated_timings
from resnet12_step import ab_script
from workloads import OnednnConvolutionsMAML

import pymeta
from pymeta.model_aware.encoding import CONV_INTS, KINDS, NUM_INTS, layer_ints, layer_row

# (N, C in, C out, map size): ResNet-12's support (N = 5 at 1-shot, 25 at 5-shot) and query
# (N = 75) convolutions, and conv4's (64 channels).
SHAPES = [
    (5, 32, 32, 32), (25, 32, 32, 32), (75, 32, 32, 32), (5, 32, 80, 16), (75, 32, 80, 16),
    (5, 80, 80, 16), (25, 80, 80, 16), (75, 80, 80, 16), (5, 80, 160, 8), (5, 160, 160, 8),
    (25, 160, 160, 8), (75, 160, 160, 8), (5, 160, 320, 4), (5, 320, 320, 4), (25, 320, 320, 4),
    (75, 320, 320, 4), (5, 64, 64, 14), (25, 64, 64, 14), (75, 64, 64, 14), (5, 64, 64, 7),
    (25, 64, 64, 7), (75, 64, 64, 7), (5, 64, 64, 3), (75, 64, 64, 3), (5, 48, 48, 8),
    (75, 80, 80, 3),
]  # fmt: skip
PATHS = {"oneDNN": (False, 0), "F(2x2)": (True, 2), "F(4x4)": (True, 4)}  # (winograd, block)


def set_path(winograd: bool, block: int) -> None:
    """The Winograd path on or off and its block forced (0: by shape), the other paths as by
    default."""
    channels_last, fused, gemm, _ = pymeta._C.cpu_fast_paths()
    pymeta._C.set_cpu_fast_paths(channels_last, fused, gemm, winograd)
    pymeta._C.set_winograd_blocks(block)


def shape_table(repeats: int) -> None:
    print(
        "| N | C in | C out | map | forward ms (GFLOP/s) | layer rules: oneDNN ms | F(2x2) ms "
        "| F(4x4) ms | rule | x faster by the rule |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    cl = torch.channels_last
    ints = layer_ints(CONV_INTS, stride=(1, 1), padding=(1, 1))
    row = layer_row(KINDS["conv2d"], 1, True, list(ints) + [0] * (NUM_INTS - len(ints)), (0,))
    saved = pymeta._C.cpu_fast_paths(), pymeta._C.winograd_blocks()
    try:
        for n, c, o, size in SHAPES:
            g = torch.Generator().manual_seed(0)
            x, rx = (torch.randn(n, c, size, size, generator=g).to(memory_format=cl) for _ in "ab")
            w, uw = (torch.randn(o, c, 3, 3, generator=g).to(memory_format=cl) for _ in "ab")
            b, ub = torch.randn(o, generator=g), torch.randn(o, generator=g)
            gy, rgy = (
                torch.randn(n, o, size, size, generator=g).to(memory_format=cl) for _ in "ab"
            )
            args = (row, 0.0, x, None, w, b, gy, rx, None, uw, ub, rgy)

            def rules(path):
                def run():
                    set_path(*path)
                    return torch.ops.pymeta.net_layer_rules(*args)

                return run

            forward = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
            want = rules(PATHS["oneDNN"])()
            for name in ("F(2x2)", "F(4x4)"):
                for a, e in zip(rules(PATHS[name])(), want):
                    if e is not None:
                        assert torch.allclose(a, e, rtol=1e-3, atol=1e-4 * e.abs().max().item())
            fns = {name: rules(path) for name, path in PATHS.items()} | {"forward": forward}
            t = {k: v["median"] * 1e3 for k, v in rotated_timings(fns, repeats, 0.1).items()}
            block = pymeta._C.winograd_block_by_shape(n, c, o, size, size)
            chosen = {0: "oneDNN", 2: "F(2x2)", 4: "F(4x4)"}[block]
            gflops = 2 * n * size * size * c * o * 9 / t["forward"] / 1e6
            print(
                f"| {n} | {c} | {o} | {size}x{size} | {t['forward']:.2f} ({gflops:.0f}) "
                f"| {t['oneDNN']:.2f} | {t['F(2x2)']:.2f} | {t['F(4x4)']:.2f} | {chosen} "
                f"| {t['oneDNN'] / t[chosen]:.2f}x |",
                flush=True,
            )
    finally:
        pymeta._C.set_cpu_fast_paths(*saved[0])
        pymeta._C.set_winograd_blocks(saved[1])


def main(argv=None) -> None:
    ab_script(
        __doc__,
        argv,
        shape_table,
        ("ModelAwareMAML without Winograd", OnednnConvolutionsMAML),
        ("ModelAwareMAML", pymeta.ModelAwareMAML),
    )


if __name__ == "__main__":
    main()
