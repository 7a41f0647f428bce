"""Files pymeta writes and reads back (checkpoints, the Omniglot tensor cache): plain data that
loads safely, verified, written atomically.

A file is a ``torch.save`` dict holding only tensors, numbers, strings, ``None`` and lists,
tuples and dicts of those, so it loads with ``torch.load(weights_only=True)``: a file holding
anything else (a pickled object whose ``__reduce__`` would run code) is refused, never executed.
It also stores its format name and version and the SHA-256 of its content (see
``content_digest``), checked on every load, so a truncated, corrupted or edited file is an error
naming it, never a silently different model. Writes go to ``<file>.<host>.<pid>.tmp`` and are
renamed into place, so a crash never leaves a half-written file; a dead writer's leftover
``.tmp`` is removed by the next save or load of that file on its host.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import zipfile
from pathlib import Path

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint or cache file that cannot be used: missing, empty, truncated, corrupted,
    holding something other than plain data, or made by another command. The message names
    the file."""


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
