"""float32 accuracy of the omniglot-shaped second-order meta-gradient (docs/model-aware.md,
"float32 accuracy"): for each seed, the float32 meta-gradient of every implementation against the
float64 per-task loop's, as the largest absolute error over all parameters relative to the
largest float64 gradient.

    .venv/bin/python benchmarks/float32_accuracy.py --tasks 4 --seeds 0 1 2 3 4 5 6 7
    .venv/bin/python benchmarks/float32_accuracy.py --network tanh-avg --tasks 4 --seeds 0 1 2

conv4 (64 channels, 28x28, 5-way 1-shot, 15 queries per class), one inner step at 0.4.
``--network tanh-avg`` swaps ReLU and max pooling for tanh and average pooling: no comparisons
that float32 can decide differently from float64 (ties), so what remains is rounding.
``--hidden`` sets conv4's width: from 48 channels its 3x3 convolutions take the Winograd path
where the core's shape rule picks it (conv4's 64 channels do; the ``pymeta_aware_no_winograd``
row keeps them in oneDNN).
"""

from __future__ import annotations

import argparse
import copy

import torch
from baselines import PerTaskLoopMAML
from omniglot_step import make_batch
from torch import nn

import pymeta

# name -> (implementation, (channels_last, fused_kernels, gemm_weight_grads, winograd)) for
# pymeta._C.set_cpu_fast_paths
IMPLEMENTATIONS = {
    "per_task_loop": (PerTaskLoopMAML, (True, True, True, True)),
    "pymeta": (pymeta.MAML, (True, True, True, True)),
    "pymeta_aware": (pymeta.ModelAwareMAML, (True, True, True, True)),
    "pymeta_aware_fused_off": (pymeta.ModelAwareMAML, (True, False, True, True)),
    "pymeta_aware_no_winograd": (pymeta.ModelAwareMAML, (True, True, True, False)),
    "pymeta_aware_aten": (pymeta.ModelAwareMAML, (False, False, False, False)),
}
NETWORKS = {"relu-max": (nn.ReLU, nn.MaxPool2d), "tanh-avg": (nn.Tanh, nn.AvgPool2d)}


def conv4_like(act, pool, hidden: int, n_way: int = 5) -> nn.Sequential:
    layers, channels = [], 1
    for _ in range(4):
        layers += [
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            act(),
            pool(2),
        ]
        channels = hidden
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden, n_way))


def meta_gradient(impl, model, batch, paths) -> list[torch.Tensor]:
    saved = pymeta._C.cpu_fast_paths()
    pymeta._C.set_cpu_fast_paths(*paths)
    try:
        model.zero_grad(set_to_none=True)
        maml = impl(model, inner_lr=0.4, inner_steps=1, first_order=False, loss="cross_entropy")
        maml.meta_loss(batch).backward()
        return [p.grad.detach().double().clone() for p in model.parameters()]
    finally:
        pymeta._C.set_cpu_fast_paths(*saved)


def relative_error(got, want) -> float:
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", choices=sorted(NETWORKS), default="relu-max")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    errors = {name: [] for name in IMPLEMENTATIONS}
    for seed in args.seeds:
        torch.manual_seed(seed)
        model32 = conv4_like(*NETWORKS[args.network], args.hidden)
        model64 = copy.deepcopy(model32).double()
        batch32 = make_batch(args.tasks, 5, 1, 15, torch.float32, seed=seed)
        batch64 = pymeta.TaskBatch(
            *(t.double() if t.is_floating_point() else t for t in batch32.__dict__.values())
        )
        truth = meta_gradient(PerTaskLoopMAML, model64, batch64, (True, True, True, True))
        for name, (impl, paths) in IMPLEMENTATIONS.items():
            errors[name].append(relative_error(meta_gradient(impl, model32, batch32, paths), truth))
    print(
        f"{args.network}, {args.hidden} channels, {args.tasks} tasks, {args.threads} thread(s): "
        "float32 meta-gradient error relative to the largest float64 gradient"
    )
    print("| implementation | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("| --- |" + " ---: |" * len(args.seeds))
    for name, values in errors.items():
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in values) + " |")


if __name__ == "__main__":
    main()
