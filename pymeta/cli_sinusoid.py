"""`python -m pymeta train sinusoid` / `eval sinusoid`: the MAML paper's regression experiment.

Protocol of Finn et al. 2017 (section 5.1): y = A sin(x - φ), A ~ U[0.1, 5.0], φ ~ U[0, π],
x ~ U[-5, 5]; the 1-40-40-1 ReLU MLP; K=10 support points in meta-training; one inner SGD step
at α=0.01; meta-batch 25; Adam 1e-3; 70,000 meta-iterations. Evaluation: query MSE before
adaptation and after 1, 5 and 10 SGD steps at α on K=5 and K=10 support points.

``--variant agnostic|aware`` meta-trains with pymeta.MAML / pymeta.ModelAwareMAML (the fused
MLP core); ``--variant pretrained`` is the paper's baseline (pymeta.baselines.Pretrained): the
same network trained by plain regression on the pooled points of the same task batches, then
fine-tuned on each test task's support set with every weight adapted. Its fine-tuning step size
is chosen on validation tasks (never the test tasks) unless ``--finetune-lr`` is given.

Every flag is checked before any training. Checkpoints are pymeta.training's safe files (plain
data, ``weights_only=True``, SHA-256 checked, tagged ``benchmark: "sinusoid"``): ``--resume``
needs the checkpoint to exist, ``--resume-if-exists`` starts from scratch when it does not.
"""

from __future__ import annotations

import argparse
import math
from typing import NamedTuple

import torch

BENCHMARK = "sinusoid"
VARIANTS = ("agnostic", "aware", "pretrained")
# Seeds of the evaluation tasks: distinct from each other and from the training generator's
# default (--seed 0), so no model is tested on tasks it was selected on.
TEST_SEED, VAL_SEED = 12345, 777
EVAL_SHOTS = (5, 10)
EVAL_STEPS = (0, 1, 5, 10)
# Candidate fine-tuning step sizes of the pretrained baseline (a log grid around α=0.01), and
# the validation tasks that choose among them: plain SGD on 5 points diverges on roughly one
# task in a thousand at a rate just too large (support points bunched at large |x|), which 600
# tasks can miss, so the rate must be stable on more.
FINETUNE_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
FINETUNE_VAL_TASKS = 2000
# A task's adaptation diverged when its query MSE is not finite or above this: four times the
# largest MSE of predicting 0 everywhere (A_max^2 = 25).
DIVERGED_MSE = 100.0
PLOT_TASKS = 2


def add_arguments(parser: argparse.ArgumentParser, train: bool) -> None:
    from pymeta.cli_args import add_resume_arguments, non_negative_int, positive_float, positive_int

    parser.add_argument("--checkpoint", default="runs/sinusoid.pt")
    parser.add_argument(
        "--test-tasks",
        type=positive_int,
        default=600,
        help="test tasks (mean ± 95%% CI over them)",
    )
    parser.add_argument(
        "--query-points",
        type=positive_int,
        default=100,
        help="query points per test task (MSE on them)",
    )
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--plot",
        default=None,
        help="write the paper-style figure (true curve, K points, predictions before and after "
        "1 and 10 steps) for a couple of test tasks to this PNG",
    )
    if not train:
        return
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default="aware",
        help="MAML (aware: fused MLP core; agnostic: autograd) or the pretrained baseline",
    )
    parser.add_argument(
        "--k-shot", type=positive_int, default=10, help="support points per task (K)"
    )
    parser.add_argument("--k-query", type=positive_int, default=10, help="query points per task")
    parser.add_argument("--meta-batch", type=positive_int, default=25, help="tasks per (meta-)step")
    parser.add_argument(
        "--inner-lr", type=positive_float, default=0.01, help="MAML inner SGD step size α"
    )
    parser.add_argument(
        "--finetune-lr",
        type=positive_float,
        default=None,
        help="pretrained: fine-tuning SGD step size (default: chosen on validation tasks from "
        + ", ".join(map(str, FINETUNE_GRID))
        + ")",
    )
    parser.add_argument("--iterations", type=positive_int, default=70000)
    parser.add_argument(
        "--lr", type=positive_float, default=1e-3, help="(meta-)optimizer (Adam) learning rate"
    )
    parser.add_argument("--log-every", type=positive_int, default=100)
    parser.add_argument(
        "--checkpoint-every", type=non_negative_int, default=1000, help="0: save only at the end"
    )
    add_resume_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and training tasks")


def _describe(config: dict) -> str:
    if config["variant"] == "pretrained":
        return "pretrained baseline (no meta-learning)"
    return f"{config['variant']} MAML"


def _build(config: dict):
    """The learner of a config; its network is the paper's 1-40-40-1 ReLU MLP."""
    import pymeta
    from pymeta.demo import sinusoid_mlp

    net = sinusoid_mlp()
    if config["variant"] == "pretrained":
        lr = config.get("finetune_lr_chosen") or config["finetune_lr"] or config["inner_lr"]
        return pymeta.baselines.Pretrained(net, loss="mse", inner_lr=lr)
    cls = pymeta.ModelAwareMAML if config["variant"] == "aware" else pymeta.MAML
    return cls(net, inner_lr=config["inner_lr"], inner_steps=1, loss="mse")


def _config(args) -> dict:
    """The run's settings: everything a resumed run must share with the checkpoint. Checks
    what argparse cannot (SystemExit, one line) before any work starts."""
    if args.finetune_lr is not None and args.variant != "pretrained":
        raise SystemExit(
            f"--finetune-lr: only for --variant pretrained, received --variant {args.variant}"
        )
    keys = ["variant", "k_shot", "k_query", "meta_batch", "inner_lr", "iterations", "lr", "seed"]
    config = {k: getattr(args, k) for k in keys}
    if args.variant == "pretrained":
        config["finetune_lr"] = args.finetune_lr  # None: chosen on validation tasks at the end
    return config


class Cell(NamedTuple):
    """One table entry: the mean query MSE over all tasks with its 95% CI half-width, how many
    tasks diverged (see DIVERGED_MSE), and the mean and CI over the others."""

    mean: float
    ci: float
    diverged: int
    rest_mean: float
    rest_ci: float


def sinusoid_tasks(num_tasks: int, k: int, query_points: int, seed: int):
    """Seeded evaluation tasks: the same functions and query points for every K (they are drawn
    first from the generator), then K support points.

    Returns:
        (TaskBatch with support (T, k, 1) and query (T, query_points, 1), amplitude (T, 1, 1),
        phase (T, 1, 1)).
    """
    from pymeta.task_batch import TaskBatch
    from pymeta.tasks import Sinusoid

    sampler = Sinusoid(k_support=k, k_query=query_points)
    generator = torch.Generator().manual_seed(seed)
    amp, phase = sampler.sample_functions(num_tasks, generator)
    low, high = sampler.x_range
    query_x = low + (high - low) * torch.rand((num_tasks, query_points, 1), generator=generator)
    support_x = low + (high - low) * torch.rand((num_tasks, k, 1), generator=generator)
    batch = TaskBatch(
        support_x, amp * torch.sin(support_x - phase), query_x, amp * torch.sin(query_x - phase)
    )
    return batch, amp, phase


@torch.no_grad()
def mse_table(model, num_tasks: int, query_points: int, seed: int) -> dict:
    """Query MSE after 0 (no adaptation), 1, 5 and 10 steps for K=5 and K=10.

    Returns:
        {(K, steps): Cell} over ``num_tasks`` seeded tasks.
    """
    from pymeta.evaluation import mean_ci95

    table = {}
    for k in EVAL_SHOTS:
        batch, _, _ = sinusoid_tasks(num_tasks, k, query_points, seed)
        for steps in EVAL_STEPS:
            if steps == 0:
                pred = model(batch.query_x)
            else:
                adapted = model.adapt(batch.support_x, batch.support_y, steps=steps, batched=True)
                pred = adapted(batch.query_x)
            per_task = (pred - batch.query_y).pow(2).mean(dim=(1, 2))  # (T,)
            diverged = ~torch.isfinite(per_task) | (per_task > DIVERGED_MSE)
            table[k, steps] = Cell(
                *mean_ci95(per_task), int(diverged.sum()), *mean_ci95(per_task[~diverged])
            )
    return table


def format_table(table: dict, title: str) -> str:
    """The table as markdown: one row per K, one column per number of steps; cells with
    diverged tasks are marked and explained below the table (their mean is kept as measured)."""
    head = "| K | " + " | ".join(f"{s} step{'s' * (s != 1)}" for s in EVAL_STEPS) + " |"
    lines = [title, "", head, "|---" * (len(EVAL_STEPS) + 1) + "|"]
    notes = []
    for k in EVAL_SHOTS:
        cells = []
        for s in EVAL_STEPS:
            cell = table[k, s]
            text = f"{cell.mean:.3f} ± {cell.ci:.3f}"
            if cell.diverged:
                notes.append(
                    f"[{len(notes) + 1}] K={k}, {s} step{'s' * (s != 1)}: SGD diverged on "
                    f"{cell.diverged} task(s) (query MSE non-finite or > {DIVERGED_MSE:g}); "
                    f"mean over the other tasks {cell.rest_mean:.3f} ± {cell.rest_ci:.3f}"
                )
                text += f" [{len(notes)}]"
            cells.append(text)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def choose_finetune_lr(model, query_points: int, num_tasks: int | None = None) -> float:
    """The pretrained baseline's fine-tuning step size: the grid value with the lowest mean of
    the table's adapted cells (1, 5, 10 steps at K=5 and K=10) on validation tasks; a rate that
    diverges on any of them loses."""
    num_tasks = num_tasks or FINETUNE_VAL_TASKS
    scores = {}
    for lr in FINETUNE_GRID:
        model.inner_lr = lr
        table = mse_table(model, num_tasks, query_points, VAL_SEED)
        cells = [table[k, s] for k in EVAL_SHOTS for s in EVAL_STEPS if s]
        score = sum(c.mean for c in cells) / len(cells)
        stable = math.isfinite(score) and not any(c.diverged for c in cells)
        scores[lr] = score if stable else math.inf
    best = min(scores, key=scores.get)
    print(
        f"fine-tuning step size on {num_tasks} validation tasks (mean MSE over 1/5/10 "
        "steps, K=5/10; inf: diverged on some task): "
        + ", ".join(f"{lr}: {s:.3f}" for lr, s in scores.items())
        + f" -> {best}"
    )
    model.inner_lr = best
    return best


def _report(model, config, args) -> dict:
    table = mse_table(model, args.test_tasks, args.query_points, TEST_SEED)
    lr = model.inner_lr if config["variant"] == "pretrained" else config["inner_lr"]
    title = (
        f"test: {_describe(config)}, query MSE on {args.test_tasks} tasks "
        f"({args.query_points} query points each), mean ± 95% CI, SGD steps of {lr:g}"
    )
    print(format_table(table, title))
    from pymeta.distributed import world

    if args.plot and world()[0] == 0:
        plot_tasks(model, config, args.plot)
        print(f"figure: {args.plot}")
    return table


def plot_tasks(model, config: dict, path, num_tasks: int = PLOT_TASKS) -> None:
    """The paper-style figure: per test task and K (rows K=5, K=10), the true curve, the K
    support points and the predictions before adaptation and after 1 and 10 steps."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "--plot: the figure needs matplotlib; install it with `pip install matplotlib` "
            "(or `pip install -e .[plot]`)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-5.0, 5.0, 200).reshape(1, -1, 1).expand(num_tasks, -1, -1)
    fig, axes = plt.subplots(
        len(EVAL_SHOTS), num_tasks, figsize=(5 * num_tasks, 3.5 * len(EVAL_SHOTS)), squeeze=False
    )
    with torch.no_grad():
        for row, k in enumerate(EVAL_SHOTS):
            batch, amp, phase = sinusoid_tasks(num_tasks, k, 1, TEST_SEED)
            curves = {"pre-update": model(grid)}
            for steps in (1, 10):
                adapted = model.adapt(batch.support_x, batch.support_y, steps=steps, batched=True)
                curves[f"{steps} grad step{'s' * (steps > 1)}"] = adapted(grid)
            for t in range(num_tasks):
                ax = axes[row, t]
                ax.plot(grid[t, :, 0], amp[t, 0] * torch.sin(grid[t, :, 0] - phase[t, 0]),
                        "r", label="ground truth")  # fmt: skip
                for (label, pred), style in zip(curves.items(), (":", "--", "-")):
                    ax.plot(grid[t, :, 0], pred[t, :, 0], style, label=label)
                ax.plot(batch.support_x[t, :, 0], batch.support_y[t, :, 0], "^k",
                        label="used for grad")  # fmt: skip
                ax.set_title(f"test task {t + 1}, K={k}")
                ax.set_xlim(-5, 5)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Sinusoid regression, {_describe(config)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(args) -> dict:
    from pymeta.checkpoints import open_resume, restore, save_checkpoint
    from pymeta.cli_args import check_checkpoint_path
    from pymeta.distributed import DistributedMeta, world
    from pymeta.tasks import Sinusoid
    from pymeta.training import meta_train

    config = _config(args)
    check_checkpoint_path(args.checkpoint, must_exist=False)
    resumed = None
    if args.resume or args.resume_if_exists:
        resumed = open_resume(args.checkpoint, BENCHMARK, config, args.resume_if_exists)
    torch.set_num_threads(args.threads)
    pretrained = config["variant"] == "pretrained"
    torch.manual_seed(config["seed"])
    model = _build(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    step, history = restore(resumed, model, optimizer, generator)
    # Under torchrun the ranks split every meta-batch (pymeta.distributed).
    learner = DistributedMeta(model) if world()[1] > 1 else model

    def checkpoint(done, hist):
        save_checkpoint(
            args.checkpoint,
            benchmark=BENCHMARK,
            config=config,
            maml=model,
            optimizer=optimizer,
            step=done,
            task_generator=generator,
            history=hist,
        )

    history = meta_train(
        learner,
        optimizer,
        Sinusoid(k_support=config["k_shot"], k_query=config["k_query"]),
        iterations=config["iterations"],
        meta_batch=config["meta_batch"],
        task_generator=generator,
        start_step=step,
        history=history,
        log_every=args.log_every,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
        # The baseline: one regression on the pooled support and query points of all tasks.
        loss_fn=learner.pretrain_loss if pretrained else None,
        desc="pretraining" if pretrained else "meta-training",
    )
    print(
        f"trained {config['iterations']} {'steps' if pretrained else 'meta-steps'} in "
        f"{history.seconds:.1f} s; checkpoint {args.checkpoint}"
    )
    if pretrained:
        if config["finetune_lr"] is None:
            config["finetune_lr_chosen"] = choose_finetune_lr(model, args.query_points)
        else:
            model.inner_lr = config["finetune_lr"]
        checkpoint(config["iterations"], history)  # keeps the chosen rate for `eval`
    return _report(model, config, args)


def evaluate(args) -> dict:
    from pymeta.checkpoints import load_checkpoint
    from pymeta.cli_args import check_checkpoint_path

    check_checkpoint_path(args.checkpoint, must_exist=True)
    blob = load_checkpoint(args.checkpoint, BENCHMARK)
    torch.set_num_threads(args.threads)
    config = blob["config"]
    model = _build(config)
    model.load_state_dict(blob["maml"])
    print(f"checkpoint {args.checkpoint}: step {blob['step']}, {_describe(config)}")
    return _report(model, config, args)
