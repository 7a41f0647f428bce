"""The build and the documented commands: what a fresh machine relies on."""

import re
from pathlib import Path

import torch

import pymeta
from pymeta import _C

ROOT = Path(__file__).resolve().parents[1]


def test_compiled_core_is_loaded_with_openmp():
    assert pymeta.HAS_COMPILED_CORE
    assert _C.with_openmp(), "built without -fopenmp: at::parallel_for would run on one thread"
    assert _C.with_cuda() == (torch.version.cuda is not None and _C.with_cuda())
    assert hasattr(torch.ops.pymeta, "sgd_update") and hasattr(
        torch.ops.pymeta, "sgd_update_backward"
    )


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^python3 -m venv \.venv .*$", readme, flags=re.M)
    assert len(commands) == 2, "README: expected exactly two one-line set-up commands"
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1 and test_cmd[0] in ci.splitlines()


def test_demo_cli_runs(capsys):
    from pymeta.__main__ import main

    assert main(["demo", "--iterations", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "meta-learned init" in out and "after 10 steps" in out
