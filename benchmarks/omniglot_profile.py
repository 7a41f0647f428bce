"""Where the omniglot-shaped second-order meta-step spends its time, and how many FLOPs it is.

Counts the convolution multiply-adds of conv4 from its shapes, then profiles one meta-step
(torch.profiler, self CPU time per op, averaged over ``--steps`` steps) for ModelAwareMAML and
for the per-task autograd loop. Both call the same oneDNN convolutions; the core runs batch
norm, ReLU and pooling in its own fused kernels (the profiler's self time of
``pymeta::net_maml_loss``, "fused (pymeta)") where the loop calls ATen's. Run it on a quiet
machine: the profiler's own overhead inflates the small ops.

Usage::

    .venv/bin/python benchmarks/omniglot_profile.py [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from omniglot_step import build, make_batch, meta_step
from torch import nn
from torch.profiler import profile

import pymeta
from pymeta.memory import retain_freed_memory

GROUPS = {
    "convolution": ("convolution", "_slow_conv2d"),
    "batch norm": ("batch_norm",),
    "max pooling": ("max_pool2d",),
    "ReLU": ("threshold_backward", "clamp_min", "relu"),
    "fused (pymeta)": ("pymeta::",),
}
CONV_KERNELS = (
    "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_slow_conv2d_forward",
    "aten::_slow_conv2d_backward",
)  # fmt: skip


def conv_macs_per_image(model: nn.Sequential, image=(1, 28, 28)) -> int:
    """Forward multiply-adds of every Conv2d and Linear for one image."""
    macs, x = 0, torch.zeros(1, *image)
    for layer in model:
        y = layer(x)
        if isinstance(layer, nn.Conv2d):
            macs += y.numel() * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
        elif isinstance(layer, nn.Linear):
            macs += layer.in_features * layer.out_features
        x = y
    return macs


def profile_table(mamls: dict, step, steps: int) -> None:
    """One row per implementation: self CPU time per meta-step (``step(maml)``, averaged over
    ``steps`` profiled steps after a warm-up) by op group, and its convolution calls."""
    groups = " | ".join(GROUPS)
    print(f"| implementation | {groups} | other | total (profiled) | conv calls |")
    print("|---|" + "---:|" * (len(GROUPS) + 3))
    for name, maml in mamls.items():
        step(maml)  # warm-up
        with profile() as prof:
            for _ in range(steps):
                step(maml)
        ms, conv_calls = defaultdict(float), 0
        for event in prof.key_averages():
            if not event.key.startswith(("aten::", "pymeta::")):
                continue
            group = next(
                (g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other"
            )
            ms[group] += event.self_cpu_time_total / 1e3 / steps
            # The kernels' own ops (not the aten::convolution wrappers around them).
            if event.key in CONV_KERNELS:
                conv_calls += event.count
        total = sum(ms.values())
        cells = " | ".join(f"{ms[g]:.0f} ms" for g in (*GROUPS, "other"))
        print(f"| {name} | {cells} | {total:.0f} ms | {conv_calls / steps:.0f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()  # as python -m pymeta does: no page faults in the profile
    torch.manual_seed(0)
    model = pymeta.models.conv4(5)
    batch = make_batch(8, 5, 1, 15, torch.float32)
    per_image = conv_macs_per_image(model)
    # Per task: query forward + backward (weights and inputs) ~ 3 passes over 75 images; the
    # support inner step (forward + backward) ~ 3 passes and its HVP ~ 6 passes over 5 images.
    macs = 8 * per_image * (3 * 75 + 9 * 5)
    print(f"conv4 forward: {per_image / 1e6:.2f} M multiply-adds per 28x28 image")
    print(f"one meta-step (8 tasks, 5 support + 75 query images): ~{2 * macs / 1e9:.0f} GFLOP\n")
    mamls = {name: build(name, model, "second") for name in ("pymeta_aware", "per_task_loop")}
    profile_table(mamls, lambda maml: meta_step(maml, model, batch), args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
