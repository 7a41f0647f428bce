"""Command-line argument checks shared by ``python -m pymeta``'s commands: a bad flag is a
one-line usage error before any work starts."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


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
