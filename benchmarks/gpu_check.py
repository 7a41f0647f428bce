"""The GPU check: one command for a lent GPU machine (under 8 minutes in all).

Usage::

    python3 benchmarks/gpu_check.py            # build with CUDA, then everything below
    python3 benchmarks/gpu_check.py --skip-build --device cpu --quick   # the smoke test here

Steps, each reported as it ends; the exit status is 1 when any step failed:

1. **Build** (unless ``--skip-build``) with ``PYMETA_CUDA=ON``. Where the running Python's torch
   is a CUDA build (a GPU machine's image, where nothing can be downloaded), pymeta is built
   against it into ``build/gpu-site``; otherwise ``tools/check_cuda_build.sh`` makes
   ``.venv-cuda`` with a CUDA torch from the package index. The script then runs again, with
   ``--skip-build``, on that build.
2. **CUDA tests** (unless ``--skip-tests``): ``pytest -q -k cuda tests/``, the tests that compare
   each CUDA kernel with its ATen twin (they skip where CUDA is absent).
3. **Parity** in float64: the meta-loss and meta-gradient of ``pymeta.MAML`` and
   ``pymeta.ModelAwareMAML`` on the device against the per-task autograd loop on the CPU, for a
   sinusoid MLP and a small conv4 (ModelAwareMAML runs its task-batched core there). An error
   is reported in its row and fails the step.
4. **Speed and memory**: one table of the second-order meta-step (float32) on the device:
   median seconds of ``--steps`` steps after 2 warm-up steps, and the peak of
   ``torch.cuda.max_memory_allocated`` over them, with ratios against the ``torch.func`` vmap
   MAML and the per-task autograd loop in the same run. ``pymeta_aware`` is the default
   (task-batched on a GPU), ``pymeta_aware_one_task_at_a_time`` the same core one task at a
   time, ``pymeta_aware_aten`` the same core with its fused CUDA kernels off (their ATen
   twins), and, on CUDA only, ``pymeta_aware_cuda_graph`` the core op captured in a CUDA graph
   once and replayed (its row reports a capture the core cannot make). Workloads: sinusoid
   (1-40-40-1, 25 tasks, 10 support and 10 query points, 1 inner step), omniglot-shaped conv4
   (5-way 1-shot, 15 queries, 28x28, 32 tasks, 1 inner step) and ResNet-12
   (``resnet12_step.py``'s default size: widths 32-80-160-320, 32x32, 5-way 1-shot, 15 queries,
   2 tasks, 5 inner steps).
   ``--quick`` shrinks every workload for a smoke test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

try:  # a fresh machine may have no torch yet: then only the build step runs, in its own venv
    import torch
    from baselines import PerTaskLoopMAML, TorchFuncMAML
    from torch import nn

    import pymeta

    def aware_with(setting: str, value):
        """ModelAwareMAML whose meta-loss runs with one core setting of pymeta._C changed."""
        get, put = getattr(pymeta._C, setting), getattr(pymeta._C, "set_" + setting)

        class Aware(pymeta.ModelAwareMAML):
            def meta_loss(self, batch):
                saved = get()
                put(value)
                try:
                    return super().meta_loss(batch)
                finally:
                    put(saved)

        return Aware

    class AwareCudaGraph(pymeta.ModelAwareMAML):
        """ModelAwareMAML's core op (meta-loss and meta-gradient; the batch checked once, when
        captured) recorded in a CUDA graph on the first step and replayed after: what graphs
        gain on a fixed-shape meta-step. The gradients land in ``.grad`` as after backward().
        CUDA only; a capture the core cannot make (a host sync inside it) is reported in its
        row."""

        _graph = None

        def meta_step(self, batch) -> None:
            if self._graph is None:
                params = self._params()
                args = self._core_args(*self._checked_batch(batch, params), params=params)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    for _ in range(3):  # warm-up off the capture, as torch.cuda.graph asks
                        torch.ops.pymeta.net_maml_loss(*args, True, False)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph):
                    self._out = torch.ops.pymeta.net_maml_loss(*args, True, False)
                self._graph, self._graph_params = graph, params
            self._graph.replay()
            for p, g in zip(self._graph_params, self._out[1]):
                p.grad = g

    IMPLEMENTATIONS = {
        "per_task_loop": PerTaskLoopMAML, "torch_func": TorchFuncMAML,
        "pymeta": pymeta.MAML, "pymeta_aware": pymeta.ModelAwareMAML,
        # The same core one task at a time, not batched (the default on a GPU): what batching
        # gains on this device; and with its fused CUDA kernels off (their ATen twins).
        "pymeta_aware_one_task_at_a_time": aware_with("task_batch", 1),
        "pymeta_aware_aten": aware_with("cuda_fused_kernels", False),
        "pymeta_aware_cuda_graph": AwareCudaGraph,
    }  # fmt: skip
    CUDA_ONLY = ("pymeta_aware_cuda_graph",)
except ImportError:
    torch = None
REFERENCES = ("torch_func", "per_task_loop")


def sinusoid_mlp() -> "nn.Module":
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def workloads(quick: bool) -> dict[str, dict]:
    """name -> model factory, batch factory (dtype, device), loss, inner steps."""
    q = quick

    def regression(tasks, k):
        def batch(dtype, device, seed=0):
            g = torch.Generator().manual_seed(seed)
            x = lambda: torch.rand(tasks, k, 1, generator=g, dtype=dtype) * 10 - 5  # noqa: E731
            sx, qx = x(), x()
            return pymeta.TaskBatch(sx, torch.sin(sx), qx, torch.sin(qx)).to(device)

        return batch

    def images(tasks, shots, queries, size, channels):
        def batch(dtype, device, seed=0):
            g = torch.Generator().manual_seed(seed)
            x = lambda k: torch.rand(tasks, 5 * k, channels, size, size, generator=g, dtype=dtype)  # noqa: E731
            y = lambda k: torch.arange(5).repeat_interleave(k).expand(tasks, -1).contiguous()  # noqa: E731
            return pymeta.TaskBatch(x(shots), y(shots), x(queries), y(queries)).to(device)

        return batch

    widths = (8, 8, 8, 8) if q else (32, 80, 160, 320)
    return {
        "sinusoid": dict(
            model=sinusoid_mlp, batch=regression(4 if q else 25, 10), loss="mse", steps=1
        ),
        "conv4": dict(
            model=lambda: pymeta.models.conv4(5, hidden=8 if q else 64),
            batch=images(2 if q else 32, 1, 2 if q else 15, 28, 1), loss="cross_entropy", steps=1,
        ),
        "resnet12": dict(
            model=lambda: pymeta.models.resnet12(5, widths=widths, image_size=16 if q else 32),
            batch=images(2, 1, 2 if q else 15, 16 if q else 32, 3), loss="cross_entropy",
            steps=2 if q else 5,
        ),
    }  # fmt: skip


def synchronize(device: "torch.device") -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def meta_step(maml, model, batch) -> None:
    if hasattr(maml, "meta_step"):  # the CUDA-graph variant replays its own step
        maml.meta_step(batch)
        return
    model.zero_grad(set_to_none=True)
    maml.meta_loss(batch).backward()


def measure(name: str, spec: dict, device: "torch.device", steps: int) -> dict:
    """Median seconds and peak device bytes of a second-order float32 meta-step."""
    torch.manual_seed(0)
    model = spec["model"]().to(device)
    try:
        maml = IMPLEMENTATIONS[name](
            model, inner_lr=0.01, inner_steps=spec["steps"], loss=spec["loss"]
        )
        batch = spec["batch"](torch.float32, device)
        for _ in range(2):
            meta_step(maml, model, batch)
    except (ValueError, TypeError, RuntimeError) as error:  # e.g. a variant refusing the device
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        meta_step(maml, model, batch)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"seconds": statistics.median(seconds), "peak": peak}


def speed_table(device: "torch.device", steps: int, quick: bool) -> tuple[str, bool]:
    lines = [
        "| workload | implementation | median s | peak MiB (device) | x vs torch_func "
        "| x vs loop |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    ok = True
    for workload, spec in workloads(quick).items():
        names = [n for n in IMPLEMENTATIONS if device.type == "cuda" or n not in CUDA_ONLY]
        results = {name: measure(name, spec, device, steps) for name in names}
        for name, r in results.items():
            if "error" in r:
                lines.append(f"| {workload} | {name} | {r['error']} | | | |")
                # Both variants run on every device; the CUDA-graph capture is an experiment.
                ok = ok and (not name.startswith("pymeta") or name in CUDA_ONLY)
                continue
            peak = f"{r['peak'] / 2**20:.1f}" if r["peak"] is not None else "n/a"
            ratios = []
            for ref in REFERENCES:
                base = results[ref].get("seconds")
                ratios.append(f"{base / r['seconds']:.2f}x" if base else "")
            lines.append(
                f"| {workload} | {name} | {r['seconds']:.4f} | {peak} | {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(lines), ok


def rel_err(got: list, want: list) -> float:
    """Largest difference over all tensors, relative to the largest reference entry (a conv bias
    before batch norm has a zero gradient: per-tensor ratios would be noise over noise)."""
    scale = max(float(w.detach().abs().max()) for w in want)
    return max(float((g.detach() - w.detach()).abs().max()) for g, w in zip(got, want)) / max(
        scale, 1e-300
    )


def parity_table(device: "torch.device") -> tuple[str, bool]:
    """float64 meta-loss and meta-gradient on the device against the CPU per-task loop."""
    lines = [
        "| workload | implementation | loss rel. error | grad rel. error |",
        "| --- | --- | ---: | ---: |",
    ]
    ok = True
    specs = workloads(quick=True)  # parity needs no size
    for workload in ("sinusoid", "conv4"):
        spec = specs[workload]
        torch.manual_seed(0)
        reference_model = spec["model"]().double()
        ref_maml = PerTaskLoopMAML(reference_model, inner_lr=0.1, inner_steps=2, loss=spec["loss"])
        ref_loss = ref_maml.meta_loss(spec["batch"](torch.float64, torch.device("cpu")))
        ref_grads = torch.autograd.grad(ref_loss, list(reference_model.parameters()))
        for name in [n for n in IMPLEMENTATIONS if n.startswith("pymeta") and n not in CUDA_ONLY]:
            model = spec["model"]().double()
            model.load_state_dict(reference_model.state_dict())
            model.to(device)
            try:
                maml = IMPLEMENTATIONS[name](model, inner_lr=0.1, inner_steps=2, loss=spec["loss"])
                loss = maml.meta_loss(spec["batch"](torch.float64, device))
                grads = torch.autograd.grad(loss, list(model.parameters()))
            except (ValueError, TypeError, RuntimeError) as error:
                message = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
                lines.append(f"| {workload} | {name} | {message} | |")
                ok = False
                continue
            loss_err = rel_err([loss.cpu()], [ref_loss])
            grad_err = rel_err([g.cpu() for g in grads], list(ref_grads))
            ok = ok and loss_err < 1e-10 and grad_err < 1e-10
            lines.append(f"| {workload} | {name} | {loss_err:.1e} | {grad_err:.1e} |")
    return "\n".join(lines), ok


def build() -> tuple[str, dict]:
    """Builds pymeta with PYMETA_CUDA=ON; returns the Python and environment to run it with.

    Where this Python's torch is a CUDA build (a GPU machine's image: nothing can be downloaded
    there), pymeta is built against it into build/gpu-site, put first on PYTHONPATH. Otherwise
    tools/check_cuda_build.sh makes .venv-cuda with a CUDA torch from the package index."""
    if torch is not None and torch.version.cuda:
        site = ROOT / "build" / "gpu-site"
        env = {**os.environ, "PYMETA_CUDA": "ON", "MAX_JOBS": os.environ.get("MAX_JOBS", "16")}
        cmd = [
            sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
            "--no-index", "--upgrade", "--target", str(site),
            "-C", "build-dir=build/gpu-check", ".",
        ]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
        return sys.executable, {**os.environ, "PYTHONPATH": path}
    subprocess.run(["bash", str(ROOT / "tools" / "check_cuda_build.sh")], check=True)
    return str(ROOT / ".venv-cuda" / "bin" / "python"), dict(os.environ)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    parser.add_argument("--steps", type=int, default=5, help="measured meta-steps per cell")
    parser.add_argument("--quick", action="store_true", help="tiny workloads (a smoke test)")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args(argv)

    if not args.skip_build:
        print("## build\n", flush=True)
        python, env = build()
        rest = argv if argv is not None else sys.argv[1:]
        again = [python, __file__, "--skip-build", *rest]
        return subprocess.run(again, cwd=Path(__file__).parent, env=env).returncode

    if torch is None:
        print("gpu_check: torch or pymeta is not importable here; run without --skip-build")
        return 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})")
        return 1
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"gpu_check: torch {torch.__version__}, device {device} ({name}), pymeta from "
        f"{Path(pymeta.__file__).parent}, CUDA kernels {pymeta._C.with_cuda()}\n",
        flush=True,
    )
    ok = True
    if not args.skip_tests:
        print("## CUDA tests\n", flush=True)
        # From outside the repository, so that `import pymeta` finds the built package, not
        # the source tree without its compiled core.
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"]
        tests = subprocess.run([*pytest, str(ROOT / "tests")], cwd="/tmp")
        ok = tests.returncode in (0, 5)  # 5: none selected
    print("## float64 parity against the CPU per-task loop\n", flush=True)
    table, parity_ok = parity_table(device)
    print(table + "\n", flush=True)
    print("## second-order meta-step, float32\n", flush=True)
    table, speed_ok = speed_table(device, args.steps, args.quick)
    print(table, flush=True)
    ok = ok and parity_ok and speed_ok
    print(f"\ngpu_check: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
