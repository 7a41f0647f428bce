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
    assert "meta-learned, pymeta.ModelAwareMAML" in out and "after 10 steps" in out
    assert "plain autograd loop" in out and "compile_step" in out


def test_cuda_build_is_configured_for_fixed_architectures_and_checked_by_a_script():
    """The CUDA build (tools/check_cuda_build.sh runs it against a CUDA torch; not in CI) targets
    explicit architectures, never the build machine's ("native": it has no GPU), and teaches
    CMake < 3.26 the C++20 flag for nvcc, which stopped the configure before."""
    import os
    import re
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmake = (root / "CMakeLists.txt").read_text()
    assert not re.search(r"CMAKE_CUDA_ARCHITECTURES[^)]*native", cmake)
    archs = re.search(r"set\(CMAKE_CUDA_ARCHITECTURES ([0-9 ]+)\)", cmake)
    assert archs and archs.group(1).split() == ["80", "90"], archs
    assert 'set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")' in cmake
    script = root / "tools" / "check_cuda_build.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "PYMETA_CUDA=ON" in text and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(script)], check=True)  # parses


def test_gpu_check_script_runs_its_checks_on_the_cpu():
    """benchmarks/gpu_check.py is the one command for a lent GPU machine; its parity and timing
    steps run here on the CPU (tiny workloads), so the script is known to work before a GPU run."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    args = ["--skip-build", "--skip-tests", "--device", "cpu", "--quick", "--steps", "1"]
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=600,
        cwd=script.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "gpu_check: OK" in out.stdout
    for workload in ("sinusoid", "conv4", "resnet12"):
        assert f"| {workload} | pymeta_aware |" in out.stdout
