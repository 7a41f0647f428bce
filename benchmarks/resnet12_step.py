"""One second-order meta-step on ResNet-12 (pymeta.models.resnet12): time and peak memory of the
per-task autograd loop (baselines.PerTaskLoopMAML, the loop a user writes with
torch.autograd.grad(create_graph=True) and torch.func.functional_call), pymeta.MAML and
pymeta.ModelAwareMAML.

Usage::

    .venv/bin/python benchmarks/resnet12_step.py [--threads 1] [--tasks 2]
        [--widths 32 80 160 320] [--image-size 32] [--shots 1 5] [--inner-steps 1 5]
        [--implementations per_task_loop pymeta pymeta_aware] [--mem-limit-gib 16] [--timeout-s 600]
        [--activation-cache-mib 64] [--core-workspace-mib 64]
    .venv/bin/python benchmarks/resnet12_step.py --full-size

Workloads: 5-way, ``--shots`` examples and 15 queries per class, ``--tasks`` tasks, 3-channel
random images, inner lr 0.01, cross-entropy. The default size (half the standard widths, 32x32
images, 2 tasks) is the one at which the loop's 5-shot, 5-step meta-step takes at most ~30 s on
one thread of the 2-core development machine (measured: 4 tasks took 49 s). ``--full-size``:
3x84x84, widths 64-160-320-640, 5-shot, 5 inner steps, one task, the loop only (add
``--implementations`` for more; measured here: 229 s and a peak of 10.9 GiB, under
``--mem-limit-gib 14``).

Each cell (shots, inner steps) runs in fresh child processes under an address-space limit
(``--mem-limit-gib``, RLIMIT_AS), so a workload that does not fit fails alone, reporting the
resident peak it reached, instead of taking the shared machine down:

- **Time** comes from one child per cell with glibc's default malloc, as a user's process runs:
  every implementation warms up on the measured batch, then they take turns, one meta-step each
  per round in an order rotated from round to round (``harness.rotated_timings``), for
  ``--repeats`` rounds (default 5), and the table has each one's median. The machine's drift
  (+-15% between processes here, and more between minutes) then hits all of them alike, and the
  ratios are the same run's.
- **Memory** comes from one child per implementation, under memory_scaling.py's fixed mmap
  threshold (repeatable RSS peaks), which warms it up on a 1-task, 1-shot, 1-step batch of the
  same network and runs ``--meta-steps`` meta-steps (default 2) of the measured batch: the
  resident-set peak over those steps beyond the RSS at their start
  (``harness.peak_rss_bytes``). That threshold makes every large allocation page-fault on each
  use, which is why it is not used for timing.

``--full-size`` times each implementation in its own child instead: one cold meta-step (a
full-size step takes minutes), with glibc's default malloc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from baselines import PerTaskLoopMAML
from harness import FIXED_MMAP_THRESHOLD, peak_rss_bytes, rotated_timings, status_kib

import pymeta

N_WAY = 5
QUERIES_PER_CLASS = 15
INNER_LR = 0.01
DEFAULT_WIDTHS = (32, 80, 160, 320)
DEFAULT_IMAGE_SIZE = 32
DEFAULT_TASKS = 2
FULL_SIZE = dict(widths=(64, 160, 320, 640), image_size=84, tasks=1, shots=[5], inner_steps=[5])
# All take pymeta.MAML's arguments: (model, inner_lr, inner_steps, first_order, loss). The
# reference comes first.
IMPLEMENTATIONS = {
    "per_task_loop": PerTaskLoopMAML, "pymeta": pymeta.MAML, "pymeta_aware": pymeta.ModelAwareMAML,
}  # fmt: skip
REFERENCE = "per_task_loop"


def make_batch(tasks: int, shots: int, queries: int, image_size: int, seed: int = 0):
    """Random 3-channel images, class-major labels: support (T, 5 * shots, 3, S, S)."""
    g = torch.Generator().manual_seed(seed)
    x = lambda k: torch.rand(tasks, N_WAY * k, 3, image_size, image_size, generator=g)  # noqa: E731
    y = lambda k: torch.arange(N_WAY).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
    return pymeta.TaskBatch(x(shots), y(shots), x(queries), y(queries))


def rotated_step_times(
    shots: int,
    steps: int,
    implementations: dict,
    repeats: int,
    widths=DEFAULT_WIDTHS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    tasks: int = DEFAULT_TASKS,
) -> dict:
    """{name: median seconds} of one second-order meta-step (by default of the default
    workload: 2 tasks, widths 32-80-160-320, 3x32x32) per implementation class, all in this
    process, in rotated rounds (harness.rotated_timings): the table's timing, and A/B tables of
    one path against another."""
    torch.manual_seed(0)
    model = pymeta.models.resnet12(N_WAY, widths=tuple(widths), image_size=image_size)
    batch = make_batch(tasks, shots, QUERIES_PER_CLASS, image_size)
    kwargs = dict(inner_lr=INNER_LR, inner_steps=steps, loss="cross_entropy")

    def step(maml):
        def run():
            model.zero_grad(set_to_none=True)
            maml.meta_loss(batch).backward()

        return run

    fns = {name: step(cls(model, **kwargs)) for name, cls in implementations.items()}
    for fn in fns.values():
        fn()
    return {k: v["median"] for k, v in rotated_timings(fns, repeats, 0.0).items()}


def ab_script(doc: str, argv, shape_table, without: tuple, with_: tuple) -> None:
    """The main() of an A/B script of one core path (winograd_conv.py, conv_weight_grad.py):
    shape_table(repeats) for the path's convolution shapes, then one second-order ResNet-12
    meta-step per shots and inner steps in rotated rounds (rotated_step_times) of the per-task
    loop, ModelAwareMAML without the path and with it; without and with_ are (label, class)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[5])
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, received {args.threads}")
    if args.repeats < 2:  # rotated_timings reports a median and an interquartile range
        parser.error(f"--repeats: expected >= 2, received {args.repeats}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} rounds, float32\n")
    if not args.skip_shapes:
        shape_table(args.repeats)
        print()
    if args.skip_steps:
        return
    print(
        f"| shots | inner steps | per-task loop s | {without[0]} s | {with_[0]} s "
        "| x faster than without the path | x faster vs loop |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    impls = {"loop": IMPLEMENTATIONS[REFERENCE], "without": without[1], "with": with_[1]}
    for shots in args.shots:
        for steps in args.inner_steps:
            t = rotated_step_times(shots, steps, impls, args.repeats)
            print(
                f"| {shots} | {steps} | {t['loop']:.2f} | {t['without']:.2f} | {t['with']:.2f} | "
                f"{t['without'] / t['with']:.2f}x | {t['loop'] / t['with']:.2f}x |",
                flush=True,
            )


def child_settings(cell: dict) -> None:
    """The child's address-space limit and the core's cache limits, from the cell."""
    limit = int(cell["mem_limit_gib"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if cell.get("activation_cache_mib") is not None:
        pymeta._C.set_activation_cache_limit(int(cell["activation_cache_mib"] * 2**20))
    if cell.get("core_workspace_mib") is not None:
        pymeta.memory.set_core_workspace_limit(int(cell["core_workspace_mib"] * 2**20))


def timing_child(cell: dict) -> dict:
    """Runs in the child process: {implementation: median seconds} of one (shots, inner steps)
    cell, all implementations in rotated rounds."""
    child_settings(cell)
    impls = {name: IMPLEMENTATIONS[name] for name in cell["implementations"]}
    try:
        return rotated_step_times(
            cell["shots"], cell["inner_steps"], impls, cell["repeats"], cell["widths"],
            cell["size"], cell["tasks"],
        )  # fmt: skip
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "memory" not in str(error).lower():
            raise
        return {"error": f"out of memory under {cell['mem_limit_gib']:g} GiB"}


def child(cell: dict) -> dict:
    """Runs in the child process: the meta-steps of one (implementation, shots, inner steps)."""
    if "implementations" in cell:
        return timing_child(cell)
    child_settings(cell)
    torch.manual_seed(0)
    model = pymeta.models.resnet12(N_WAY, widths=tuple(cell["widths"]), image_size=cell["size"])
    cls = IMPLEMENTATIONS[cell["implementation"]]

    def build(steps):
        return cls(model, inner_lr=INNER_LR, inner_steps=steps, loss="cross_entropy")

    def meta_step(maml, batch):
        model.zero_grad(set_to_none=True)
        maml.meta_loss(batch).backward()

    meta_step(build(1), make_batch(1, 1, 1, cell["size"], seed=1))  # warm-up
    maml = build(cell["inner_steps"])
    batch = make_batch(cell["tasks"], cell["shots"], QUERIES_PER_CLASS, cell["size"])
    model.zero_grad(set_to_none=True)
    seconds = []

    def timed_steps():  # timed inside, so the gc and trim of peak_rss_bytes are not counted
        for _ in range(cell["meta_steps"]):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            maml.meta_loss(batch).backward()
            seconds.append(time.perf_counter() - start)

    start_kib = status_kib("VmRSS")
    try:
        rss = peak_rss_bytes(timed_steps)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "memory" not in str(error).lower():
            raise
        reached = (status_kib("VmHWM") - start_kib) * 1024
        return {"error": f"out of memory under {cell['mem_limit_gib']:g} GiB", "rss": reached}
    return {"seconds": seconds[-1], "rss": rss}


def run_child(cell: dict, threads: int, timeout_s: float, fixed_mmap_threshold: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--child"]
    malloc = FIXED_MMAP_THRESHOLD if fixed_mmap_threshold else {}
    env = {**malloc, "OMP_NUM_THREADS": str(threads), **os.environ}
    try:
        proc = subprocess.run(
            cmd, input=json.dumps(cell), capture_output=True, text=True, env=env, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s:g} s (stopped)"}
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        return {"error": f"child exited with status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[tuple[dict, dict]]) -> str:
    lines = [
        "| implementation | shots | inner steps | seconds | peak MiB (RSS) | x faster vs loop "
        "| memory vs loop |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = {
        (c["shots"], c["inner_steps"]): r for c, r in rows if c["implementation"] == REFERENCE
    }
    for cell, result in rows:
        ref = reference.get((cell["shots"], cell["inner_steps"]), {})
        mib = f"{result['rss'] / 2**20:.0f}" if result.get("rss") is not None else "n/a"
        if "error" in result:
            seconds = result["error"]
            mib = f"reached {mib}" if result.get("rss") is not None else mib
            speed = memory = ""
        else:
            seconds = f"{result['seconds']:.2f}"
            speed = f"{ref['seconds'] / result['seconds']:.2f}x" if ref.get("seconds") else ""
            memory = (
                f"{result['rss'] / ref['rss']:.2f}" if ref.get("rss") and "error" not in ref else ""
            )
        lines.append(
            f"| {cell['implementation']} | {cell['shots']} | {cell['inner_steps']} | {seconds} "
            f"| {mib} | {speed} | {memory} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--tasks", type=int, default=DEFAULT_TASKS)
    parser.add_argument("--widths", type=int, nargs=4, default=list(DEFAULT_WIDTHS))
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument(
        "--implementations", nargs="+", choices=list(IMPLEMENTATIONS), default=None,
        help=f"default: all ({REFERENCE} only with --full-size); {REFERENCE} is always run",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=5,
        help="timed rounds per cell, the implementations in rotated order (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--meta-steps", type=int, default=2,
        help="meta-steps of each memory process: the peak is the most over all of them "
        "(default 2; 1: a cold first step)",
    )  # fmt: skip
    parser.add_argument(
        "--timing-malloc", choices=["default", "fixed"], default="default",
        help="malloc of the timing process: glibc's default (default) or the memory process's "
        "fixed mmap threshold (how this table was timed before 2026-12-02)",
    )  # fmt: skip
    parser.add_argument("--full-size", action="store_true", help="the standard ResNet-12 point")
    parser.add_argument("--mem-limit-gib", type=float, default=16.0, help="per child (RLIMIT_AS)")
    parser.add_argument(
        "--activation-cache-mib", type=float, default=None,
        help="the model-aware core's activation cache limit (default: the core's, 64 MiB)",
    )  # fmt: skip
    parser.add_argument(
        "--core-workspace-mib", type=float, default=None,
        help="the model-aware core's workspace cache limit (default: the core's, 64 MiB)",
    )  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 2:  # rotated_timings reports a median and an interquartile range
        parser.error(f"--repeats: expected >= 2, received {args.repeats}")
    if args.meta_steps < 1:
        parser.error(f"--meta-steps: expected >= 1, received {args.meta_steps}")
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(sys.stdin.read()))))
        return

    if args.full_size:
        args.widths, args.image_size, args.tasks = FULL_SIZE["widths"], 84, FULL_SIZE["tasks"]
        args.shots, args.inner_steps = FULL_SIZE["shots"], FULL_SIZE["inner_steps"]
        args.meta_steps = 1  # one full-size step takes minutes: a cold first step
        args.implementations = args.implementations or [REFERENCE]
    wanted = args.implementations or list(IMPLEMENTATIONS)
    names = [n for n in IMPLEMENTATIONS if n in wanted or n == REFERENCE]
    rows = []
    fixed = args.timing_malloc == "fixed"
    for shots in args.shots:
        for steps in args.inner_steps:
            cells = [
                dict(
                    implementation=name,
                    shots=shots,
                    inner_steps=steps,
                    tasks=args.tasks,
                    widths=list(args.widths),
                    size=args.image_size,
                    mem_limit_gib=args.mem_limit_gib,
                    meta_steps=args.meta_steps,
                    activation_cache_mib=args.activation_cache_mib,
                    core_workspace_mib=args.core_workspace_mib,
                )
                for name in names
            ]
            if args.full_size:  # one cold step per implementation, each in its own process
                times = {}
                for cell in cells:
                    print(f"timing {cell['implementation']} ...", file=sys.stderr)
                    timed = run_child(cell, args.threads, args.timeout_s, fixed)
                    times[cell["implementation"]] = timed.get("seconds", timed.get("error"))
            else:
                print(f"timing {shots}-shot, {steps} inner steps ...", file=sys.stderr)
                rounds = dict(cells[0], implementations=names, repeats=args.repeats)
                times = run_child(rounds, args.threads, args.timeout_s, fixed)
            for cell in cells:
                name = cell["implementation"]
                print(f"memory of {name}, {shots}-shot, {steps} inner steps ...", file=sys.stderr)
                peak = run_child(cell, args.threads, args.timeout_s, fixed_mmap_threshold=True)
                seconds = times.get(name, times.get("error", "not timed"))
                result = {"seconds": seconds if isinstance(seconds, float) else None}
                result["rss"] = peak.get("rss")
                if result["seconds"] is None or "error" in peak:
                    result["error"] = peak.get("error") or seconds
                rows.append((cell, result))
    widths = "-".join(map(str, args.widths))
    timing_malloc = "fixed mmap threshold" if fixed else "default malloc"
    rounds = f"medians of {args.repeats} rotated rounds"
    timing = "one cold step per process" if args.full_size else rounds
    print(
        f"ResNet-12 (widths {widths}, 3x{args.image_size}x{args.image_size}), {N_WAY}-way, "
        f"{QUERIES_PER_CLASS} queries per class, {args.tasks} task(s), second order, float32; "
        f"time: {timing}, {timing_malloc}; memory: fixed mmap threshold; "
        f"torch {torch.__version__}, {args.threads} thread(s)\n"
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
