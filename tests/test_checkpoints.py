"""Checkpoint and cache files (pymeta.safe_files.save_file / load_file): only plain data, loaded
with weights_only=True so a crafted file runs no code; a SHA-256 that catches one flipped byte;
clear errors naming the file for empty, truncated, garbage, foreign and other-benchmark files;
strict --resume; no .tmp leftovers."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from pymeta.__main__ import main
from pymeta.checkpoints import load_checkpoint
from pymeta.datasets import Omniglot
from pymeta.safe_files import CheckpointError

SINUSOID = "--meta-batch 2 --test-tasks 4 --query-points 5 --log-every 1 --no-progress".split()
OMNIGLOT = (
    "--hidden 4 --image-size 16 --n-way 2 --k-query 2 --meta-batch 2 --val-every 0 "
    "--val-tasks 2 --test-tasks 2 --test-query 2 --log-every 1 --no-progress"
).split()


class Payload:
    """Unpickling this creates the folder ``marker``: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def train_sinusoid(ckpt, iterations=2, *extra):
    argv = ["train", "sinusoid", "--checkpoint", str(ckpt), "--iterations", str(iterations)]
    return main([*argv, *SINUSOID, *extra])


def eval_sinusoid(ckpt):
    return main(["eval", "sinusoid", "--checkpoint", str(ckpt), "--test-tasks", "2"])


def train_omniglot(root, cache, ckpt, iterations=1, *extra):
    argv = ["train", "omniglot", "--root", str(root), "--cache-dir", str(cache)]
    argv += ["--checkpoint", str(ckpt), "--iterations", str(iterations)]
    return main([*argv, *OMNIGLOT, *extra])


def eval_omniglot(root, cache, ckpt):
    argv = ["eval", "omniglot", "--root", str(root), "--cache-dir", str(cache)]
    return main([*argv, "--checkpoint", str(ckpt), "--test-tasks", "2", "--test-query", "2"])


def plain(value) -> bool:
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["aware", "agnostic", "pretrained"])
def test_checkpoints_hold_only_plain_data_with_format_benchmark_and_hash(variant, tmp_path):
    ckpt = tmp_path / "run.pt"
    train_sinusoid(ckpt, 2, "--variant", variant)
    blob = torch.load(ckpt, weights_only=True)
    assert plain(blob)
    assert blob["format"] == "pymeta-checkpoint" and blob["version"] == 1
    assert blob["benchmark"] == "sinusoid" and len(blob["sha256"]) == 64
    assert isinstance(blob["rng"]["python"]["state"], torch.Tensor)


def test_a_checkpoint_that_would_run_code_is_refused(tiny_root, tmp_path):
    ckpt, marker = tmp_path / "run.pt", tmp_path / "pwned"
    train_sinusoid(ckpt)
    blob = torch.load(ckpt, weights_only=True)
    blob["history"]["extra"] = Payload(marker)
    torch.save(blob, ckpt)
    refused = rf"refusing to load '{ckpt}': it holds something other than tensors"
    with pytest.raises(CheckpointError, match=refused):
        eval_sinusoid(ckpt)
    with pytest.raises(CheckpointError, match=refused):
        train_sinusoid(ckpt, 4, "--resume")
    with pytest.raises(CheckpointError, match=refused):
        eval_omniglot(tiny_root, tmp_path / "cache", ckpt)
    assert not marker.exists()


def test_a_cache_that_would_run_code_is_refused(tiny_root, tmp_path, monkeypatch):
    # Even when the environment asks torch.load to unpickle anything by default.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cache_dir, marker = tmp_path / "cache", tmp_path / "pwned"
    Omniglot(tiny_root, cache_dir=cache_dir)
    (cache,) = cache_dir.glob("*.pt")
    torch.save({"images": torch.zeros(1), "names": [], "x": Payload(marker)}, cache)
    with pytest.raises(CheckpointError, match=rf"cache: refusing to load '{cache}'"):
        Omniglot(tiny_root, cache_dir=cache_dir)
    assert not marker.exists()


def flip_a_weight_byte(ckpt):
    blob = torch.load(ckpt, weights_only=True)
    weight = blob["maml"]["module.2.weight"]  # the 40x40 hidden layer
    data = bytearray(ckpt.read_bytes())
    at = data.find(weight.numpy().tobytes())
    assert at > 0
    data[at + 801] ^= 0x01
    ckpt.write_bytes(bytes(data))
    changed = torch.load(ckpt, weights_only=True)["maml"]["module.2.weight"]
    assert not torch.equal(changed, weight)  # torch.load itself notices nothing


def test_a_flipped_byte_in_a_weight_is_detected(tmp_path):
    ckpt = tmp_path / "run.pt"
    train_sinusoid(ckpt)
    flip_a_weight_byte(ckpt)
    corrupted = rf"checkpoint: '{ckpt}' is corrupted: its content does not match its stored SHA"
    with pytest.raises(CheckpointError, match=corrupted):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=corrupted):
        eval_sinusoid(ckpt)
    with pytest.raises(CheckpointError, match=corrupted):
        train_sinusoid(ckpt, 4, "--resume")


def damage(path, how):
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(bytes(range(256)) * 8)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_checkpoints_give_an_error_naming_the_file(how, tmp_path):
    ckpt = tmp_path / "run.pt"
    train_sinusoid(ckpt)
    damage(ckpt, how)
    with pytest.raises(CheckpointError, match=rf"checkpoint: '{ckpt}' is (empty|truncated)"):
        eval_sinusoid(ckpt)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_damaged_caches_give_an_error_naming_the_file(how, tiny_root, tmp_path):
    Omniglot(tiny_root, cache_dir=tmp_path)
    (cache,) = tmp_path.glob("*.pt")
    damage(cache, how)
    with pytest.raises(CheckpointError, match=rf"cache: '{cache}' is .* delete it to rebuild"):
        Omniglot(tiny_root, cache_dir=tmp_path)


def test_files_without_the_format_are_refused(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"config": {"variant": "aware"}, "maml": {}, "step": 1}, other)
    with pytest.raises(CheckpointError, match=r"expected a pymeta-checkpoint file in"):
        eval_sinusoid(other)


def test_eval_refuses_the_other_benchmarks_checkpoint(tiny_root, tmp_path):
    sinusoid, omniglot, cache = tmp_path / "s.pt", tmp_path / "o.pt", tmp_path / "cache"
    train_sinusoid(sinusoid)
    train_omniglot(tiny_root, cache, omniglot)
    with pytest.raises(
        CheckpointError,
        match=r"expected a checkpoint of `train omniglot`, received one of `train sinusoid`",
    ):
        eval_omniglot(tiny_root, cache, sinusoid)
    with pytest.raises(
        CheckpointError,
        match=r"expected a checkpoint of `train sinusoid`, received one of `train omniglot`",
    ):
        eval_sinusoid(omniglot)
    with pytest.raises(CheckpointError, match=r"of `train sinusoid`, received one of `train omn"):
        train_sinusoid(omniglot, 4, "--resume")


def test_resume_needs_an_existing_checkpoint_unless_asked_not_to(tmp_path, capsys):
    ckpt = tmp_path / "run.pt"
    with pytest.raises(SystemExit, match=r"--resume: expected an existing checkpoint"):
        train_sinusoid(ckpt, 2, "--resume")
    assert not ckpt.exists()
    train_sinusoid(ckpt, 2, "--resume-if-exists")  # nothing to resume: starts from scratch
    assert torch.load(ckpt, weights_only=True)["step"] == 2
    train_sinusoid(ckpt, 3, "--resume-if-exists")
    assert "resuming from step 2" in capsys.readouterr().out
    assert torch.load(ckpt, weights_only=True)["step"] == 3


def test_resume_with_fewer_iterations_than_saved_says_so(tmp_path):
    ckpt = tmp_path / "run.pt"
    train_sinusoid(ckpt, 4)
    with pytest.raises(
        SystemExit, match=r"--iterations: expected at least the checkpoint's step 4 .* received 2"
    ):
        train_sinusoid(ckpt, 2, "--resume")


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftover_tmp_files_are_removed_and_a_failed_save_leaves_none(tmp_path, monkeypatch):
    ckpt, host = tmp_path / "run.pt", socket.gethostname()
    stale = tmp_path / f"run.pt.{host}.{dead_pid()}.tmp"
    live = tmp_path / f"run.pt.{host}.{os.getppid()}.tmp"  # a writer still running
    remote = tmp_path / f"run.pt.other-host.{dead_pid()}.tmp"  # its writer: unknown here
    for tmp in (stale, live, remote):
        tmp.write_bytes(b"half a checkpoint")
    train_sinusoid(ckpt)
    assert not stale.exists() and live.exists() and remote.exists()
    stale.write_bytes(b"half a checkpoint")
    eval_sinusoid(ckpt)  # loading cleans up too
    assert not stale.exists()
    live.unlink()
    remote.unlink()

    # A save that fails half-way (disk full, Ctrl-C) keeps the previous checkpoint, no .tmp.
    before = ckpt.read_bytes()

    def failing_save(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        train_sinusoid(ckpt, 2)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]
