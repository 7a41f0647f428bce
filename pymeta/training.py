"""Meta-training loop with progress and periodic validation, and the files it writes:
checkpoints that resume exactly and load safely.

A checkpoint (and the Omniglot tensor cache, which uses the same writer and reader) is a
``torch.save`` dict holding only tensors, numbers, strings, ``None`` and lists, tuples and dicts
of those, so it loads with ``torch.load(weights_only=True)``: a file holding anything else (a
pickled object whose ``__reduce__`` would run code) is refused, never executed. It also stores
its format name and version and the SHA-256 of its content (see ``content_digest``), checked on
every load, so a truncated, corrupted or edited file is an error naming it, never a silently
different model. Writes go to ``<file>.<host>.<pid>.tmp`` and are renamed into place, so a crash
never leaves a half-written file; a dead writer's leftover ``.tmp`` is removed by the next save
or load of that file on its host.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import random
import socket
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

CHECKPOINT_FORMAT = "pymeta-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or cache file that cannot be used: missing, empty, truncated, corrupted,
    holding something other than plain data, or made by another command. The message names
    the file."""


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


# ---------------------------------------------------------------------------- safe files
def content_digest(value) -> str:
    """SHA-256 (hex) of plain data: tensors (dtype, shape and bytes), numbers, strings, None,
    and lists, tuples and dicts of those, in order. Anything else is a TypeError."""
    h = hashlib.sha256()
    _digest(value, h)
    return h.hexdigest()


def _digest(value, h) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        h.update(f"d{len(value)}:".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"{'l' if isinstance(value, list) else 't'}{len(value)}:".encode())
        for item in value:
            _digest(item, h)
    elif value is None or isinstance(value, (bool, int, str)):
        h.update(f"{type(value).__name__}{len(repr(value))}:{value!r}".encode())
    elif isinstance(value, float):
        h.update(f"float:{value.hex()};".encode())
    elif isinstance(value, (torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value};".encode())
    else:
        raise TypeError(
            f"value: expected tensors, numbers, strings, None and lists/tuples/dicts of those, "
            f"received {type(value).__name__}"
        )


def _writer_tmp(path: Path) -> Path:
    # Host and pid name the writer, so a reader can tell a dead writer's leftover from a live
    # one's file, even on a folder shared between machines.
    return path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_tmp(path) -> list[Path]:
    """Removes ``<path>.<host>.<pid>.tmp`` files written on this host by a process that is gone
    (a save interrupted by a crash or kill) and returns them; a live writer's file, or one
    from another host, is left alone."""
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    prefix, host = path.name + ".", socket.gethostname()
    for tmp in path.parent.iterdir():
        name = tmp.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        writer_host, _, pid = name[len(prefix) : -len(".tmp")].rpartition(".")
        if writer_host != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _pid_alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:  # gone already, or a read-only folder: nothing to clean
                continue
            removed.append(tmp)
    return removed


def _unpickling_detail(message: str) -> str:
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in message.splitlines()]
    detail = [line for line in lines if line and not line.startswith(boilerplate)]
    return detail[0] if detail else "unpickling failed"


def save_file(path, blob: dict, file_format: str) -> None:
    """Writes ``blob`` (plain data only, see ``content_digest``) with its format, version and
    SHA-256, atomically: to ``<path>.<host>.<pid>.tmp``, then renamed over ``path``.

    Raises:
        TypeError: ``blob`` holds something other than plain data (nothing is written).
    """
    path = Path(path)
    body = {"format": file_format, "version": FORMAT_VERSION, **blob}
    body["sha256"] = content_digest(body)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = _writer_tmp(path)
    try:
        torch.save(body, tmp)
        os.replace(tmp, path)  # never leave a half-written file in place
    except BaseException:
        tmp.unlink(missing_ok=True)  # interrupted or failed (disk full, Ctrl-C): no leftovers
        raise


def load_file(path, file_format: str, what: str = "checkpoint") -> dict:
    """Reads a file written by ``save_file`` with ``torch.load(weights_only=True)`` and checks
    its format, version and SHA-256; tensors land on the CPU.

    Args:
        path: the file.
        file_format: the format it must have been saved with.
        what: the name errors start with ("checkpoint", "cache").

    Raises:
        CheckpointError: naming the file, when it is missing, empty, truncated, corrupted,
            holds anything but plain data (refused unread: no code in it runs), is of another
            format or version, or its content does not match its SHA-256.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: expected an existing file, received {str(path)!r}")
    remove_stale_tmp(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what}: {str(path)!r} is empty (an interrupted copy?)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only refuses any global it does not know, and any opcode it cannot read,
        # before calling anything. Keep torch's detail line, not its advice to retry unsafely.
        detail = _unpickling_detail(str(err))
        if "GLOBAL" in detail.upper():
            raise CheckpointError(
                f"{what}: refusing to load {str(path)!r}: it holds something other than "
                f"tensors, numbers and strings, which could run code ({detail})"
            ) from None
        raise CheckpointError(
            f"{what}: {str(path)!r} is truncated or corrupted, or holds data weights_only "
            f"cannot read; refusing to load it ({detail})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"{what}: {str(path)!r} is truncated or corrupted, not a readable torch.save file "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''})"
        ) from None
    if not isinstance(blob, dict) or blob.get("format") != file_format:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"{what}: expected a {file_format} file in {str(path)!r}, received "
            f"{found or 'a file without a format (not pymeta, or from before format 1)'}"
        )
    if blob.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{what}: expected format version {FORMAT_VERSION} in {str(path)!r}, received "
            f"{blob.get('version')!r}"
        )
    stored = blob.pop("sha256", None)
    try:
        actual = content_digest(blob)
    except TypeError as err:
        raise CheckpointError(f"{what}: {str(path)!r} holds unexpected data ({err})") from None
    if stored != actual:
        raise CheckpointError(
            f"{what}: {str(path)!r} is corrupted: its content does not match its stored SHA-256 "
            f"(expected {stored}, received {actual})"
        )
    return blob


# ---------------------------------------------------------------------------- command line
def _number(kind, convert, accept, expected: str):
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, received {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, received {value}")
        return value

    parse.__name__ = kind  # argparse names the type in its own messages
    return parse


# argparse ``type=`` values: a bad flag is a one-line usage error before any work starts.
positive_int = _number("positive_int", int, lambda v: v > 0, "a positive int")
non_negative_int = _number("non_negative_int", int, lambda v: v >= 0, "an int >= 0")
positive_float = _number(
    "positive_float", float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0"
)


def check_checkpoint_path(path, must_exist: bool) -> None:
    """Refuses (SystemExit, one line) a ``--checkpoint`` that cannot be written or read: a
    folder, a path under a regular file, or (``must_exist``) a missing file."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"--checkpoint: expected a file path, received the folder {str(path)!r}")
    if must_exist and not path.is_file():
        raise SystemExit(f"--checkpoint: expected an existing file, received {str(path)!r}")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise SystemExit(
                    f"--checkpoint: expected a path under a folder, received {str(path)!r} "
                    f"under the regular file {str(parent)!r}"
                )
            break


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` (the checkpoint must exist) and ``--resume-if-exists`` (for jobs that are
    rerun as they are after a preemption)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume", action="store_true", help="continue exactly from --checkpoint (must exist)"
    )
    group.add_argument(
        "--resume-if-exists",
        action="store_true",
        help="continue from --checkpoint when it exists, else start from scratch",
    )


# ---------------------------------------------------------------------------- checkpoints
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
    ``task_generator`` (uint8 state), ``rng`` (see ``rng_state``), ``history``."""
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
        maml: a pymeta.MAML / ModelAwareMAML.
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
        batch = train_tasks.sample(meta_batch, task_generator)
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
