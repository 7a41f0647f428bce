"""Benchmark workloads and the implementations under test, shared by the pytest-benchmark
suite (``conftest.py``, ``test_*.py``) and the one-process comparison script (``compare.py``).
"""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass, field

import torch
from baselines import PerTaskLoopMAML, TorchFuncMAML
from libraries import HigherMAML, Learn2LearnMAML, TorchOptMAML
from torch import nn

import pymeta

WORKLOADS = ("sinusoid", "sinusoid-5", "wide-mlp")
ORDERS = ("second", "first")


class LayeredAwareMAML(pymeta.ModelAwareMAML):
    """ModelAwareMAML with the core's MLP fast path switched off for its calls: MLPs run
    through the per-layer rules, which shows what the fast path saves."""

    def meta_loss(self, batch):
        pymeta._C.set_mlp_fast_path(False)
        try:
            return super().meta_loss(batch)
        finally:
            pymeta._C.set_mlp_fast_path(True)


class CorePathsMAML(pymeta.ModelAwareMAML):
    """ModelAwareMAML with some of the layered core's CPU fast paths switched off for its own
    meta-steps (``pymeta._C.set_cpu_fast_paths``): what each path gains, measured in one run."""

    paths = (True, True, True, True)  # (channels_last, fused_kernels, gemm_weight_grads, winograd)

    def meta_loss(self, batch):
        saved = pymeta._C.cpu_fast_paths()
        pymeta._C.set_cpu_fast_paths(*self.paths)
        try:
            return super().meta_loss(batch)
        finally:
            pymeta._C.set_cpu_fast_paths(*saved)


class BlasGemmMAML(pymeta.ModelAwareMAML):
    """ModelAwareMAML with the layered core's float32 matrix products through at::bmm (BLAS)
    instead of oneDNN's brgemm (``pymeta._C.set_onednn_gemm(False)``) for its own meta-steps."""

    def meta_loss(self, batch):
        saved = pymeta._C.onednn_gemm()
        pymeta._C.set_onednn_gemm(False)
        try:
            return super().meta_loss(batch)
        finally:
            pymeta._C.set_onednn_gemm(saved)


class ChannelsLastOnlyMAML(CorePathsMAML):
    paths = (True, False, False, False)


class OnednnWeightGradsMAML(CorePathsMAML):
    paths = (True, True, False, False)


class OnednnConvolutionsMAML(CorePathsMAML):
    """Every convolution in oneDNN: no Winograd (the other paths on)."""

    paths = (True, True, True, False)


class AtenOnlyMAML(CorePathsMAML):
    paths = (False, False, False, False)


# All take pymeta.MAML's arguments: (model, inner_lr, inner_steps, first_order, loss).
IMPLEMENTATIONS = {
    "pymeta": pymeta.MAML,
    "pymeta_aware": pymeta.ModelAwareMAML,
    "pymeta_aware_layered": LayeredAwareMAML,
    "per_task_loop": PerTaskLoopMAML,
    "torch_func": TorchFuncMAML,
    "learn2learn": Learn2LearnMAML,
    "higher": HigherMAML,
    "torchopt": TorchOptMAML,
}
# Implementations that need a package which may not be installed: name -> package.
OPTIONAL_PACKAGES = {"learn2learn": "learn2learn", "higher": "higher", "torchopt": "torchopt"}


def available(implementation: str) -> bool:
    """Whether the implementation's package, if it needs one, is installed (not imported)."""
    package = OPTIONAL_PACKAGES.get(implementation)
    return package is None or importlib.util.find_spec(package) is not None


def available_implementations() -> list[str]:
    return [name for name in IMPLEMENTATIONS if available(name)]


@dataclass
class Workload:
    """A model, a fixed meta-batch and the MAML settings to run on it."""

    name: str
    model: nn.Module
    batch: pymeta.TaskBatch
    maml_kwargs: dict = field(default_factory=dict)

    def build(self, implementation: str, order: str):
        """The named implementation wrapped around this workload's model."""
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, received {order!r}")
        cls = IMPLEMENTATIONS[implementation]
        return cls(self.model, first_order=order == "first", **self.maml_kwargs)

    def meta_step(self, maml) -> torch.Tensor:
        """One meta-step minus the optimizer update: zero grads, meta-loss, backward."""
        self.model.zero_grad(set_to_none=True)
        loss = maml.meta_loss(self.batch)
        loss.backward()
        return loss


def mlp(*sizes: int) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def make_workload(
    name: str, dtype: torch.dtype = torch.float32, seed: int = 0, **maml_overrides
) -> Workload:
    """Builds a workload with a seeded model and meta-batch.

    "sinusoid": MLP 1-40-40-1, 25 tasks, 10 support / 10 query, 1 inner step, lr 0.01, MSE
    (the regression setting of the MAML paper).
    "sinusoid-5": the same with 5 inner steps, where second-order terms compound.
    "wide-mlp": MLP 64-256-256-10, 32 tasks, 25 support / 75 query, 5 inner steps, lr 0.1,
    cross-entropy on Gaussian inputs with random labels (a 10-way, few-shot sized workload
    where the matrix multiplies, not Python overhead, should dominate).

    ``maml_overrides`` replace the MAML settings (e.g. ``inner_steps=2``).
    """
    torch.manual_seed(seed)  # model initialization
    gen = torch.Generator().manual_seed(seed)  # data
    if name in ("sinusoid", "sinusoid-5"):
        model = mlp(1, 40, 40, 1)
        batch = pymeta.tasks.Sinusoid(k_support=10, k_query=10, dtype=dtype).sample(25, gen)
        steps = 5 if name == "sinusoid-5" else 1
        kwargs = {"inner_lr": 0.01, "inner_steps": steps, "loss": "mse"}
    elif name == "wide-mlp":
        model = mlp(64, 256, 256, 10)
        tasks, k_support, k_query = 32, 25, 75
        x = torch.randn(tasks, k_support + k_query, 64, generator=gen, dtype=dtype)
        y = torch.randint(0, 10, (tasks, k_support + k_query), generator=gen)
        batch = pymeta.TaskBatch(
            x[:, :k_support], y[:, :k_support], x[:, k_support:], y[:, k_support:]
        )
        kwargs = {"inner_lr": 0.1, "inner_steps": 5, "loss": "cross_entropy"}
    else:
        raise ValueError(f"workload: expected one of {WORKLOADS}, received {name!r}")
    kwargs.update(maml_overrides)
    return Workload(name, model.to(dtype), batch, kwargs)
