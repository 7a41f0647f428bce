#!/usr/bin/env bash
# Builds pymeta with its CUDA kernels (PYMETA_CUDA=ON) against a CUDA build of torch, on a
# machine that has nvcc but may have no GPU, and fails on any configure, compile, link or load
# error. Not part of .ci/run, which stays CPU-only: the CUDA torch is several GB.
#
#   tools/check_cuda_build.sh            # side venv .venv-cuda (made once, then reused)
#
# Settings (environment): PYMETA_CUDA_VENV (default .venv-cuda), PYMETA_CUDA_TORCH (the CUDA
# torch release, default 2.14.1: the one whose CUDA matches this machine's nvcc 13.0),
# CMAKE_CUDA_ARCHITECTURES (default 80;90, set in CMakeLists.txt; never "native").
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PYMETA_CUDA_VENV:-$root/.venv-cuda}
torch_version=${PYMETA_CUDA_TORCH:-2.14.1}
cd "$root"

command -v nvcc >/dev/null || { echo "check_cuda_build: nvcc not found on PATH" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q "torch==$torch_version" scikit-build-core pybind11 numpy ninja tqdm pillow
"$venv/bin/python" - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} is a CPU build; the check needs a CUDA one"
print(f"check_cuda_build: torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

# The pinned torch==2.13.0 is the CPU build's pin: --no-deps keeps this venv's CUDA torch. A
# build dir of its own keeps the CPU build's CMake cache apart.
args=()
[ -n "${CMAKE_CUDA_ARCHITECTURES:-}" ] && args+=(-C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$CMAKE_CUDA_ARCHITECTURES")
mkdir -p build
set +e
PYMETA_CUDA=ON MAX_JOBS=${MAX_JOBS:-2} "$venv/bin/pip" install --no-build-isolation --no-deps -v \
  -C build-dir=build/cuda-check "${args[@]}" . > build/cuda-check.log 2>&1
status=$?
set -e
grep -E "pymeta: |error|\.cu.*warning|Successfully installed" build/cuda-check.log || true
if [ "$status" -ne 0 ]; then
  echo "check_cuda_build: FAILED (pip exit $status); full log in build/cuda-check.log" >&2
  exit "$status"
fi

# Loading the module resolves every symbol (a link error shows here), and the CUDA kernels
# must be registered; no GPU is needed for either.
(cd /tmp && "$venv/bin/python" - <<'PY')
import torch
import pymeta
from pymeta import _C  # fails loudly if the core did not load
assert _C.with_cuda(), "pymeta._C was built without its CUDA kernels"
has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [op for op in ("pymeta::sgd_update", "pymeta::net_maml_loss", "pymeta::net_adapt",
                               "pymeta::adam_step", "pymeta::sgd_step", "pymeta::net_layer_rules")
           if not has(op, "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"check_cuda_build: OK, pymeta built with CUDA kernels against torch {torch.__version__}")
PY
