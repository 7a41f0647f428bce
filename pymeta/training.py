"""Meta-training loop with progress, periodic validation and checkpoints (``pymeta.checkpoints``),
and its learning curves."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from tqdm import tqdm


@dataclass
class History:
    """Learning curves: per logged step the running meta-loss (the training loss, for
    pretraining) and accuracy when measured, and the validation accuracy at each validation."""

    step: list = field(default_factory=list)
    meta_loss: list = field(default_factory=list)
    train_acc: list = field(default_factory=list)
    val_step: list = field(default_factory=list)
    val_acc: list = field(default_factory=list)
    seconds: float = 0.0


def meta_train(
    maml,
    optimizer,
    train_tasks,
    *,
    iterations: int,
    meta_batch: int,
    task_generator,
    start_step: int = 0,
    history: History | None = None,
    validate=None,
    val_every: int = 0,
    train_accuracy=None,
    log_every: int = 50,
    checkpoint=None,
    checkpoint_every: int = 0,
    progress: bool = True,
    loss_fn=None,
    desc: str = "meta-training",
) -> History:
    """Runs meta-steps start_step .. iterations - 1.

    Args:
        maml: a pymeta.MAML / ModelAwareMAML; under torch.distributed, wrapped in
            ``pymeta.distributed.DistributedMeta`` (each rank then samples its share of every
            meta-batch; see docs/distributed.md).
        optimizer: over ``maml.parameters()``.
        train_tasks: a sampler with ``sample(n, generator)``.
        iterations: total meta-steps (including those before start_step).
        meta_batch: tasks per meta-step.
        task_generator: the torch.Generator that draws the tasks (saved in checkpoints).
        validate: optional ``() -> accuracy``, run every ``val_every`` steps and at the end.
        train_accuracy: optional ``(batch) -> accuracy`` of the current batch, at log steps.
        checkpoint: optional ``(step, history) -> None`` called every ``checkpoint_every``
            steps and at the end.
        loss_fn: optional ``(batch) -> scalar`` minimised instead of ``maml.meta_loss`` (the
            pretraining baseline trains ``Pretrained.pretrain_loss`` with this same loop).
        desc: the progress bar's label.
    """
    from pymeta.distributed import shard, world

    rank, size = world()
    # Under torch.distributed each rank draws every task's randomness and builds its own share
    # (the single process's tasks, split), and only rank 0 shows progress.
    sample_kwargs = {"shard": shard()} if size > 1 else {}
    progress = progress and rank == 0
    history = history or History()
    bar = tqdm(
        range(start_step, iterations),
        initial=start_step,
        total=iterations,
        desc=desc,
        disable=not progress,
        mininterval=0.5,
    )
    running = history.meta_loss[-1] if history.meta_loss else None
    loss_name = "meta-loss" if loss_fn is None else "training loss"
    loss_fn = loss_fn or maml.meta_loss
    t0 = time.perf_counter()
    for step in bar:
        batch = train_tasks.sample(meta_batch, task_generator, **sample_kwargs)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{loss_name} became {value} at step {step}; lower the learning rates"
            )
        running = value if running is None else 0.98 * running + 0.02 * value
        done = step + 1
        if done % log_every == 0 or done == iterations:
            acc = train_accuracy(batch) if train_accuracy else float("nan")
            history.step.append(done)
            history.meta_loss.append(running)
            history.train_acc.append(acc)
            bar.set_postfix(meta_loss=f"{running:.3f}", acc=f"{acc:.3f}", refresh=False)
        if validate and ((val_every and done % val_every == 0) or done == iterations):
            history.val_step.append(done)
            history.val_acc.append(validate())
            if rank == 0:
                bar.write(f"step {done}: validation accuracy {history.val_acc[-1]:.4f}")
        if checkpoint and (
            (checkpoint_every and done % checkpoint_every == 0) or done == iterations
        ):
            history.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint(done, history)
    history.seconds += time.perf_counter() - t0
    return history


def plot_history(
    history: History,
    path,
    title: str = "",
    step_label: str = "meta-step",
    loss_label: str = "meta-loss",
    train_label: str = "train (query, after adaptation)",
) -> None:
    """Writes the learning curves (meta-loss; train and validation accuracy) to a PNG; the
    labels name what was trained (e.g. "step", "loss", "train (batch)" for pretraining)."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "plot: writing learning curves needs matplotlib; install it with "
            "`pip install matplotlib` (or `pip install -e .[plot]`)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history.step, history.meta_loss)
    ax_loss.set_xlabel(step_label)
    ax_loss.set_ylabel(f"{loss_label} (running mean)")
    ax_acc.plot(history.step, history.train_acc, label=train_label)
    if history.val_step:
        ax_acc.plot(history.val_step, history.val_acc, "o-", label="validation")
    ax_acc.set_xlabel(step_label)
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
