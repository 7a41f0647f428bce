"""Checkpoints of a training run: everything a resumed run needs to continue exactly as if never
stopped, in a safe file (``pymeta.safe_files``: plain data, ``weights_only`` loads, SHA-256)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from pymeta.safe_files import CheckpointError, load_file, save_file
from pymeta.training import History

CHECKPOINT_FORMAT = "pymeta-checkpoint"


def rng_state() -> dict:
    """The global RNG states as plain data: torch's (a uint8 tensor) and Python's (its
    ``random.getstate()`` as version, int64 tensor and gauss_next)."""
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))


def save_checkpoint(
    path,
    *,
    benchmark: str,
    config: dict,
    maml,
    optimizer,
    step: int,
    task_generator,
    history: History,
) -> None:
    """Everything a resumed run needs to continue exactly as if never stopped, as a safe file
    (see the module docstring): keys ``benchmark`` (the ``train`` command that wrote it),
    ``config``, ``maml`` (state dict), ``optimizer`` (state dict), ``step``,
    ``task_generator`` (uint8 state), ``rng`` (see ``rng_state``), ``history``. Under
    torch.distributed only rank 0 writes (the ranks' states are equal), and the file is the same
    as a single process's: it resumes under any number of ranks."""
    from pymeta.distributed import world

    if world()[0] != 0:  # under torch.distributed every rank holds the same state: rank 0 writes
        return
    blob = {
        "benchmark": benchmark,
        "config": config,
        "maml": maml.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "task_generator": task_generator.get_state(),
        "rng": rng_state(),
        "history": dict(history.__dict__),
    }
    save_file(path, blob, CHECKPOINT_FORMAT)


def load_checkpoint(path, benchmark: str | None = None) -> dict:
    """A checkpoint written by ``save_checkpoint``, verified (see ``load_file``).

    Args:
        path: the checkpoint file.
        benchmark: when given, the ``train`` command it must come from ("omniglot", ...).

    Raises:
        CheckpointError: see ``load_file``; or the checkpoint is of another benchmark.
    """
    blob = load_file(path, CHECKPOINT_FORMAT, "checkpoint")
    if benchmark is not None and blob.get("benchmark") != benchmark:
        raise CheckpointError(
            f"checkpoint: expected a checkpoint of `train {benchmark}`, received one of "
            f"`train {blob.get('benchmark')}` in {str(path)!r}"
        )
    return blob


def open_resume(path, benchmark: str, config: dict, missing_ok: bool = False) -> dict | None:
    """The checkpoint to resume from, checked before any work: it exists (else SystemExit, or
    None when ``missing_ok``), is intact and of ``benchmark`` (else CheckpointError), was made
    with the same settings (all of ``config`` but ``iterations``) and a step no later than
    ``config["iterations"]`` (else SystemExit)."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return None
        raise SystemExit(
            f"--resume: expected an existing checkpoint, received {str(path)!r} (use "
            "--resume-if-exists to start from scratch when there is none)"
        )
    blob = load_checkpoint(path, benchmark)
    mismatch = [k for k in config if k != "iterations" and blob["config"].get(k) != config[k]]
    if mismatch:
        raise SystemExit(f"--resume: the checkpoint was made with other settings: {mismatch}")
    if blob["step"] > config["iterations"]:
        raise SystemExit(
            f"--iterations: expected at least the checkpoint's step {blob['step']} to resume "
            f"{str(path)!r}, received {config['iterations']}"
        )
    return blob


def restore(blob: dict | None, model, optimizer, task_generator) -> tuple[int, History]:
    """Loads a checkpoint from ``open_resume`` into a freshly built run: model, optimizer, task
    generator and global RNG states, so it continues exactly. Returns (step, history); (0, an
    empty History) for None (nothing to resume)."""
    if blob is None:
        return 0, History()
    model.load_state_dict(blob["maml"])
    optimizer.load_state_dict(blob["optimizer"])
    task_generator.set_state(blob["task_generator"])
    set_rng_state(blob["rng"])
    print(f"resuming from step {blob['step']}")
    return blob["step"], History(**blob["history"])
