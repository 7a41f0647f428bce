"""Page faults and CPU time of the omniglot-shaped second-order meta-step in fresh processes,
with glibc's default malloc and with pymeta.memory.retain_freed_memory().

Each (implementation, malloc) pair runs in its own process, since glibc's thresholds depend on
what the process freed before: ``--warmup`` steps, then ``--steps`` measured steps (getrusage).

Usage::

    .venv/bin/python benchmarks/page_faults.py [--warmup 8] [--steps 3] [--core-workspace-mib 0 32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

IMPLEMENTATIONS = ("pymeta_aware", "per_task_loop")


def child(name: str, retain: bool, warmup: int, steps: int, workspace_mib: float | None) -> None:
    import torch
    from omniglot_step import build, make_batch, meta_step

    import pymeta

    if retain:
        pymeta.memory.retain_freed_memory()
    if workspace_mib is not None:
        pymeta.memory.set_core_workspace_limit(int(workspace_mib * 2**20))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = pymeta.models.conv4(5)
    batch = make_batch(8, 5, 1, 15, torch.float32)
    maml = build(name, model, "second")
    for _ in range(warmup):
        meta_step(maml, model, batch)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(steps):
        meta_step(maml, model, batch)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "wall_s": (time.perf_counter() - start) / steps,
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "system_s": (after.ru_stime - before.ru_stime) / steps,
                "user_s": (after.ru_utime - before.ru_utime) / steps,
            }
        )
    )


def run(name: str, retain: bool, workspace_mib: float | None, args) -> dict:
    cmd = [sys.executable, __file__, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--child", name, str(int(retain))]  # fmt: skip
    if workspace_mib is not None:
        cmd += ["--core-workspace-mib", str(workspace_mib)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--core-workspace-mib", type=float, nargs="+", default=None,
        help="extra ModelAwareMAML rows (glibc defaults) with these core workspace cache limits",
    )  # fmt: skip
    parser.add_argument("--child", nargs=2, metavar=("NAME", "RETAIN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mib = args.core_workspace_mib[0] if args.core_workspace_mib else None
        child(args.child[0], args.child[1] == "1", args.warmup, args.steps, mib)
        return 0
    print(f"omniglot-shaped second-order meta-step, 1 thread, {args.warmup} warm-up steps\n")
    print(
        "| implementation | malloc | core workspace cache | page faults / step | system s / step "
        "| user s / step | wall s / step |"
    )
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    rows = [(name, retain, None) for name in IMPLEMENTATIONS for retain in (False, True)]
    rows += [("pymeta_aware", False, mib) for mib in args.core_workspace_mib or []]
    for name, retain, mib in rows:
        r = run(name, retain, mib, args)
        malloc = "retain_freed_memory()" if retain else "glibc defaults"
        cache = "default" if mib is None else f"{mib:g} MiB"
        print(
            f"| {name} | {malloc} | {cache} | {r['faults']:.0f} | {r['system_s']:.3f} "
            f"| {r['user_s']:.3f} | {r['wall_s']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
