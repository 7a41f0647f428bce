"""Where ResNet-12's second-order meta-step spends its time: ``resnet12_step.py``'s workload
(widths 32-80-160-320, 3x32x32, 2 tasks, 5-way, 15 queries per class) profiled op group by op
group (``omniglot_profile.profile_table``: torch.profiler self CPU time per meta-step, and the
number of convolution kernel calls) for ModelAwareMAML and the per-task autograd loop, plus the
core's recomputation counters (what its default activation cache did not keep).

Usage::

    .venv/bin/python benchmarks/resnet12_profile.py [--shots 1] [--inner-steps 5] [--steps 2]
        [--activation-cache-mib 64]
"""

from __future__ import annotations

import argparse
import sys

import torch
from omniglot_profile import profile_table
from resnet12_step import IMPLEMENTATIONS, INNER_LR, make_batch

import pymeta
from pymeta import _C


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--activation-cache-mib", type=float, default=None, help="default: the core's (64 MiB)"
    )
    args = parser.parse_args(argv)
    if min(args.shots, args.inner_steps, args.steps) < 1:
        parser.error("--shots, --inner-steps and --steps: expected >= 1")
    torch.set_num_threads(1)
    if args.activation_cache_mib is not None:
        _C.set_activation_cache_limit(int(args.activation_cache_mib * 2**20))
    torch.manual_seed(0)
    model = pymeta.models.resnet12(5, widths=(32, 80, 160, 320), image_size=32)
    batch = make_batch(2, args.shots, 15, 32)
    kwargs = dict(inner_lr=INNER_LR, inner_steps=args.inner_steps, loss="cross_entropy")
    mamls = {
        name: IMPLEMENTATIONS[name](model, **kwargs) for name in ("pymeta_aware", "per_task_loop")
    }

    def step(maml):
        model.zero_grad(set_to_none=True)
        maml.meta_loss(batch).backward()

    print(
        f"ResNet-12 {args.shots}-shot, {args.inner_steps} inner steps, second order, 1 thread; "
        f"activation cache {_C.activation_cache_limit() / 2**20:.0f} MiB\n"
    )
    counters = (_C.sweep_recomputed_passes, _C.sweep_recomputed_steps, _C.recomputed_layers)
    before = [c() for c in counters]
    profile_table(mamls, step, args.steps)
    # pymeta_aware ran the warm-up and the profiled steps.
    per_step = [(c() - b) / (args.steps + 1) for c, b in zip(counters, before)]
    print(
        "\nModelAwareMAML recomputed per meta-step: {:.0f} support passes, {:.0f} inner steps, "
        "{:.0f} layers of checkpointed passes".format(*per_step)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
