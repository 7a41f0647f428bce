"""Soak test: many meta-steps of each variant, resident memory (RSS) sampled at intervals, to show
that memory stays flat (no leak in the compiled core, the autograd graph or the Python side).

Each (variant, workload) runs in its own fresh process, so one run's memory cannot hide or
inflate another's: a fresh meta-batch every step, ``meta_loss``, ``backward``, an Adam step and
``loss.item()``, as a training loop does. RSS comes from /proc/self/statm (resource's peak RSS
where /proc is missing). The verdict per run: RSS growth from the first sample after the warm-up
to the end (MiB and %), and the least-squares slope over those samples.

Not part of CI (10,000 steps of each variant take minutes to hours on a small machine).

Usage::

    .venv/bin/python benchmarks/soak.py [--steps 10000] [--every 500] [--warmup 500]
        [--variants maml aware] [--workloads sinusoid conv] [--threads 1]
        [--retain-freed-memory] [--csv soak.csv] [--plot soak.png] [--max-growth-mib 8]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

VARIANTS = ("maml", "aware")
WORKLOADS = ("sinusoid", "conv")


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # no /proc: the peak, in KiB on Linux and bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 2**10)


def build(variant: str, workload: str):
    """(learner, optimizer, sample(step) -> TaskBatch) for one run."""
    import torch

    import pymeta

    cls = pymeta.MAML if variant == "maml" else pymeta.ModelAwareMAML
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    if workload == "sinusoid":  # the MAML paper's regression setting
        model = torch.nn.Sequential(
            torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU(),
            torch.nn.Linear(40, 1),
        )  # fmt: skip
        maml = cls(model, inner_lr=0.01, inner_steps=1, loss="mse")
        tasks = pymeta.tasks.Sinusoid(k_support=10, k_query=10)
        return maml, torch.optim.Adam(maml.parameters(), 1e-3), lambda: tasks.sample(25, gen)
    # A small conv4 (8 channels, 16x16 images), 5-way 1-shot, 5 queries per class, 4 tasks.
    model = pymeta.models.conv4(5, hidden=8, image_size=16)
    maml = cls(model, inner_lr=0.4, inner_steps=1, loss="cross_entropy")

    def sample():
        x = torch.randn(4, 30, 1, 16, 16, generator=gen)
        y = torch.arange(5).repeat(6).expand(4, 30).contiguous()
        return pymeta.TaskBatch(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])

    return maml, torch.optim.Adam(maml.parameters(), 1e-3), sample


def child(variant: str, workload: str, args) -> None:
    """Runs one soak in this process; prints one JSON line per sample to stdout."""
    import torch

    import pymeta

    if args.retain_freed_memory:
        pymeta.memory.retain_freed_memory()
    torch.set_num_threads(args.threads)
    maml, opt, sample = build(variant, workload)
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc=f"{variant}/{workload}", file=sys.stderr,
                   mininterval=2.0, dynamic_ncols=True)  # fmt: skip
    except ImportError:
        bar = None
    start = time.perf_counter()

    def report(step: int, loss: float) -> None:
        row = dict(step=step, rss_mib=rss_mib(), seconds=time.perf_counter() - start, loss=loss)
        print(json.dumps(row), flush=True)

    report(0, float("nan"))
    for step in range(1, args.steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = maml.meta_loss(sample())
        loss.backward()
        opt.step()
        value = loss.item()
        if bar is not None:
            bar.update()
        if step % args.every == 0 or step == args.steps:
            report(step, value)
    if bar is not None:
        bar.close()


def run(variant: str, workload: str, args) -> list[dict]:
    """Runs one soak in a fresh process; its progress bar goes to this process's stderr."""
    cmd = [sys.executable, __file__, "--child", variant, workload, "--steps", str(args.steps),
           "--every", str(args.every), "--threads", str(args.threads)]  # fmt: skip
    if args.retain_freed_memory:
        cmd.append("--retain-freed-memory")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}/{workload}: the soak process exited with {proc.returncode}")
    return [dict(json.loads(line), variant=variant, workload=workload)
            for line in proc.stdout.splitlines() if line.startswith("{")]  # fmt: skip


def verdict(rows: list[dict], warmup: int) -> dict:
    """Growth from the first sample at or after ``warmup`` steps to the last one."""
    after = [r for r in rows if r["step"] >= warmup] or rows[-1:]
    first, last = after[0], after[-1]
    growth = last["rss_mib"] - first["rss_mib"]
    slope = 0.0
    if len(after) > 1:  # least squares, MiB per 1000 steps
        xs, ys = [r["step"] for r in after], [r["rss_mib"] for r in after]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return dict(
        from_step=first["step"], to_step=last["step"], from_mib=first["rss_mib"],
        to_mib=last["rss_mib"], growth_mib=growth, growth_pct=100 * growth / first["rss_mib"],
        slope_mib_per_1k=slope, steps_per_s=last["step"] / last["seconds"],
    )  # fmt: skip


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; skipped", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in sorted({(r["variant"], r["workload"]) for r in rows}):
        run_rows = [r for r in rows if (r["variant"], r["workload"]) == key]
        steps, rss = [r["step"] for r in run_rows], [r["rss_mib"] for r in run_rows]
        ax.plot(steps, rss, label="/".join(key))
    ax.set_xlabel("meta-step")
    ax.set_ylabel("RSS (MiB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000, help="meta-steps per run")
    parser.add_argument("--every", type=int, default=500, help="steps between RSS samples")
    parser.add_argument("--warmup", type=int, default=500,
                        help="steps before the sample the growth is measured from")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["sinusoid"])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument(
        "--retain-freed-memory",
        action="store_true",
        help="call pymeta.memory.retain_freed_memory() first, as the CLI does",
    )
    parser.add_argument("--max-growth-mib", type=float, default=8.0,
                        help="growth above which a run is reported as growing")  # fmt: skip
    parser.add_argument("--csv", help="write every sample to this CSV file")
    parser.add_argument("--plot", help="write RSS against step to this PNG (needs matplotlib)")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("steps", "every", "threads"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name}: expected a positive int, received {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup: expected an int >= 0, received {args.warmup}")
    if args.child:
        child(*args.child, args)
        return 0

    rows, verdicts = [], {}
    for workload in args.workloads:
        for variant in args.variants:
            run_rows = run(variant, workload, args)
            rows += run_rows
            verdicts[(variant, workload)] = verdict(run_rows, args.warmup)
            print(f"\n{variant}/{workload}: RSS (MiB) at steps")
            print("\n".join(f"  {r['step']:>7}  {r['rss_mib']:8.1f}  {r['seconds']:8.1f} s"
                            for r in run_rows))  # fmt: skip

    print(f"\nthreads {args.threads}, retain_freed_memory {args.retain_freed_memory}")
    print(f"{'run':<18}{'steps':>14}{'RSS from':>10}{'to':>8}{'growth':>10}{'%':>7}"
          f"{'MiB/1k':>9}{'steps/s':>9}  verdict")  # fmt: skip
    worst = 0.0
    for (variant, workload), v in verdicts.items():
        ok = v["growth_mib"] <= args.max_growth_mib
        worst = max(worst, v["growth_mib"])
        print(f"{variant + '/' + workload:<18}{v['from_step']:>6}-{v['to_step']:<7}"
              f"{v['from_mib']:>10.1f}{v['to_mib']:>8.1f}{v['growth_mib']:>+10.2f}"
              f"{v['growth_pct']:>+7.2f}{v['slope_mib_per_1k']:>+9.3f}{v['steps_per_s']:>9.1f}"
              f"  {'flat' if ok else 'GROWING'}")  # fmt: skip
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            fields = ["variant", "workload", "step", "rss_mib", "seconds", "loss"]
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    return 0 if worst <= args.max_growth_mib else 1


if __name__ == "__main__":
    sys.exit(main())
