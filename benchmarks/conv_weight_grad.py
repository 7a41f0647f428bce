"""Convolution weight gradients by matrix products, the model-aware core's third CPU fast path
(``weight_grad_by_gemm`` in csrc/net/layers.cpp), against oneDNN's backward-weights kernels.

Two tables, each measured in this one process in rotated rounds (harness.rotated_timings,
medians):

1. Per convolution shape: the forward convolution (oneDNN, and its rate), one weight gradient
   by oneDNN (``aten.convolution_backward``) and by the path's matrix product written in
   PyTorch ops (its reference twin, checked against oneDNN's result first), float32,
   channels-last, and whether the core's shape rule takes the path there. The shapes are
   ResNet-12's (``resnet12_step.py``: support N = 5 or 25, queries N = 75) and conv4's (64
   channels at 7x7 and 3x3). The rule's thresholds come from this table; the core's own path
   is a few copies leaner than the twin.
2. One second-order meta-step of ``resnet12_step.py``'s workload (widths 32-80-160-320, 3x32x32,
   2 tasks, 5-way, 15 queries per class): ModelAwareMAML with the path, without it
   (``OnednnWeightGradsMAML``), and the per-task autograd loop; both ModelAwareMAML rows without
   the Winograd path (``OnednnConvolutionsMAML``), which takes ResNet-12's 3x3 convolutions
   from block 2 on (benchmarks/winograd_conv.py).

Usage::

    .venv/bin/python benchmarks/conv_weight_grad.py [--threads 1] [--repeats 5]
        [--shots 1 5] [--inner-steps 5] [--skip-shapes] [--skip-steps]
"""

from __future__ import annotations

import torch
from harness import rotated_timings
from resnet12_step import ab_script
from workloads import OnednnConvolutionsMAML, OnednnWeightGradsMAML

# (N, C in, C out, map size, kernel): ResNet-12's support (N = 5 at 1-shot, 25 at 5-shot) and
# query (N = 75) convolutions, and conv4's.
SHAPES = [
    (5, 32, 32, 32, 3), (5, 32, 80, 16, 3), (5, 80, 80, 16, 3), (5, 80, 160, 8, 3),
    (5, 160, 160, 8, 3), (5, 160, 320, 4, 3), (5, 320, 320, 4, 3), (5, 160, 320, 4, 1),
    (25, 160, 160, 8, 3), (25, 320, 320, 4, 3), (75, 160, 160, 8, 3), (75, 160, 320, 4, 3),
    (75, 320, 320, 4, 3), (5, 64, 64, 7, 3), (25, 64, 64, 7, 3), (5, 64, 64, 3, 3),
    (75, 64, 64, 3, 3),
]  # fmt: skip


def takes_gemm_path(n: int, c: int, size: int, kernel: int) -> bool:
    """The core's shape rule (weight_grad_by_gemm), for the table's last column."""
    positions = size * size  # padding kernel // 2, stride 1: the map keeps its size
    if kernel == 1:
        return False
    return c * kernel * kernel >= 720 and (n * positions <= 320 or positions <= 16)


def gemm_weight_grad(gy: torch.Tensor, x: torch.Tensor, kernel: int, padding: int) -> torch.Tensor:
    """The path's arithmetic in PyTorch ops (stride 1, one task): gy^T patches(x), the patches in
    the channels-last weight order (kh, kw, C). Its reference twin, for the per-shape table."""
    n, c = x.shape[:2]
    o, ho, wo = gy.shape[1:]
    xp = torch.nn.functional.pad(x, (padding,) * 4).permute(0, 2, 3, 1).contiguous()
    s = xp.stride()
    patches = xp.as_strided((n, ho, wo, kernel, kernel, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    rows = gy.permute(0, 2, 3, 1).reshape(n * ho * wo, o)
    gw = rows.t() @ patches.reshape(n * ho * wo, kernel * kernel * c)
    return gw.view(o, kernel, kernel, c).permute(0, 3, 1, 2)


def shape_table(repeats: int) -> None:
    print(
        "| N | C in | C out | map | kernel | forward ms (GFLOP/s) | weight grad: oneDNN ms "
        "| matrix product ms | x faster | rule |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    cl = torch.channels_last
    for n, c, o, size, kernel in SHAPES:
        g = torch.Generator().manual_seed(0)
        pad = kernel // 2
        x = torch.randn(n, c, size, size, generator=g).to(memory_format=cl)
        w = torch.randn(o, c, kernel, kernel, generator=g).to(memory_format=cl)
        gy = torch.randn(n, o, size, size, generator=g).to(memory_format=cl)
        geometry = ([1, 1], [pad, pad], [1, 1], False, [0, 0], 1)
        onednn = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            gy, x, w, None, *geometry, [False, True, False]
        )[1]
        product = lambda: gemm_weight_grad(gy, x, kernel, pad)  # noqa: E731
        forward = lambda: torch.nn.functional.conv2d(x, w, padding=pad)  # noqa: E731
        want = onednn()
        assert torch.allclose(product(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        t = rotated_timings({"onednn": onednn, "gemm": product, "forward": forward}, repeats, 0.1)
        a, b, f = (t[k]["median"] * 1e3 for k in ("onednn", "gemm", "forward"))
        gflops = 2 * n * size * size * c * o * kernel * kernel / f / 1e6
        rule = "matrix product" if takes_gemm_path(n, c, size, kernel) else "oneDNN"
        shape = f"| {n} | {c} | {o} | {size}x{size} | {kernel}x{kernel} |"
        print(f"{shape} {f:.2f} ({gflops:.0f}) | {a:.2f} | {b:.2f} | {a / b:.2f}x | {rule} |")


def main(argv=None) -> None:
    ab_script(
        __doc__,
        argv,
        shape_table,
        ("ModelAwareMAML, oneDNN weight grads", OnednnWeightGradsMAML),
        ("ModelAwareMAML (both without Winograd)", OnednnConvolutionsMAML),
    )


if __name__ == "__main__":
    main()
