"""Determinism (docs/reliability.md): for a fixed thread count, the same inputs give bit-identical
meta-losses and meta-gradients, call after call, in both variants and both of the model-aware
core's kernels; across thread counts results agree to rounding (ATen's reductions split work by
thread), which the test bounds in float32."""

import contextlib

import pytest
import torch
from torch import nn

import pymeta


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def network(kind: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)), (6,)
    body = [
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(8 * 4 * 4, 4)), (1, 8, 8)


def batch(example, tasks=6, k=5, q=7, seed=1) -> pymeta.TaskBatch:
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(tasks, n, *example, generator=g)  # noqa: E731
    y = lambda n: torch.randint(0, 4, (tasks, n), generator=g)  # noqa: E731
    return pymeta.TaskBatch(x(k), y(k), x(q), y(q))


def meta_step(maml, b) -> list[torch.Tensor]:
    params = [p for p in maml.parameters() if p.requires_grad]
    loss = maml.meta_loss(b)
    return [loss.detach(), *torch.autograd.grad(loss, params)]


VARIANTS = {
    "agnostic": lambda model: pymeta.MAML(model, inner_lr=0.3, inner_steps=2, loss="cross_entropy"),
    "aware": lambda model: pymeta.ModelAwareMAML(
        model, inner_lr=0.3, inner_steps=2, loss="cross_entropy"
    ),
}


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("n_threads", [1, 2])
def test_a_fixed_thread_count_gives_bit_identical_results(kind, variant, n_threads):
    model, example = network(kind)
    maml = VARIANTS[variant](model)
    b = batch(example)
    with threads(n_threads):
        first = meta_step(maml, b)
        for _ in range(2):
            again = meta_step(maml, b)
            for x, y in zip(first, again):
                assert torch.equal(x, y), "the same meta-step gave different bits"


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_thread_counts_agree_to_rounding(kind, variant):
    model, example = network(kind)
    maml = VARIANTS[variant](model)
    b = batch(example)
    with threads(1):
        one = meta_step(maml, b)
    with threads(2):
        two = meta_step(maml, b)
    scale = max(float(t.abs().max()) for t in one[1:])
    assert float((one[0] - two[0]).abs()) <= 1e-5 * float(one[0].abs())
    err = max(float((x - y).abs().max()) for x, y in zip(one[1:], two[1:])) / scale
    assert err < 1e-5, f"1 vs 2 threads: meta-gradients differ by {err:.2e} of the largest"


if (
    __name__ == "__main__"
):  # the figures docs/reliability.md quotes: python tests/test_determinism.py
    for kind in ("mlp", "conv"):
        for variant in sorted(VARIANTS):
            model, example = network(kind)
            maml, b = VARIANTS[variant](model), batch(example)
            with threads(1):
                one = meta_step(maml, b)
            with threads(2):
                two = meta_step(maml, b)
            scale = max(float(t.abs().max()) for t in one[1:])
            grad_err = max(float((x - y).abs().max()) for x, y in zip(one[1:], two[1:])) / scale
            loss_err = float((one[0] - two[0]).abs() / one[0].abs())
            print(
                f"{kind} {variant}: 1 vs 2 threads, loss {loss_err:.1e}, gradients {grad_err:.1e}"
            )
