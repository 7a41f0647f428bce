"""Page faults and CPU time of the omniglot-shaped second-order meta-step in fresh processes,
with glibc's default malloc and with pymeta.memory.retain_freed_memory().

Each (implementation, malloc) pair runs in its own process, since glibc's thresholds depend on
what the process freed before: ``--warmup`` steps, then ``--steps`` measured steps (getrusage).

Usage::

    .venv/bin/python benchmarks/page_faults.py [--warmup 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

IMPLEMENTATIONS = ("pymeta_aware", "per_task_loop")


def child(name: str, retain: bool, warmup: int, steps: int) -> None:
    import torch
    from omniglot_step import build, make_batch, meta_step

    import pymeta

    if retain:
        pymeta.memory.retain_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = pymeta.models.conv4(5)
    batch = make_batch(8, 5, 1, 15, torch.float32)
    maml = build(name, model, "second")
    for _ in range(warmup):
        meta_step(maml, model, batch)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        meta_step(maml, model, batch)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "system_s": (after.ru_stime - before.ru_stime) / steps,
                "user_s": (after.ru_utime - before.ru_utime) / steps,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("NAME", "RETAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.warmup, args.steps)
        return 0
    print(f"omniglot-shaped second-order meta-step, 1 thread, {args.warmup} warm-up steps\n")
    print("| implementation | malloc | page faults / step | system s / step | user s / step |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name in IMPLEMENTATIONS:
        for retain in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, "--warmup", str(args.warmup), "--steps",
                 str(args.steps), "--child", name, str(int(retain))],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            malloc = "retain_freed_memory()" if retain else "glibc defaults"
            print(
                f"| {name} | {malloc} | {r['faults']:.0f} | {r['system_s']:.3f} "
                f"| {r['user_s']:.3f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
