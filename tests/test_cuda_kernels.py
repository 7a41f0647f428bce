"""The fused CUDA kernels of batch norm and the activations (csrc/cuda/fused_layers.h) against
their ATen twins (the rules of csrc/net/layers.cpp, which run when
``pymeta._C.set_cuda_fused_kernels(False)``) and against torch.func, in float64 on the GPU; and
the model-aware core on CUDA with and without them, against the CPU. All but the first test need
CUDA and a build with it; ``benchmarks/gpu_check.py`` runs them (``pytest -k cuda``)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from parity import rel_err
from test_layer_rules import (
    CASES,
    OUTPUTS,
    assert_matches,
    in_layout,
    inputs_for,
    reference,
    run_op,
)
from test_task_batched import NETWORKS, maml_factory

from pymeta import _C

# torch.func's forward AD loads torch's own jit-scripted decompositions on first use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.with_cuda()),
    reason="needs a CUDA device and pymeta built with its CUDA kernels",
)
TWIN_TOL = 1e-12  # fused against its ATen twin, float64: the same formulas, other rounding
FUSED = [n for n, c in CASES.items() if c.kind in ("batchnorm", "activation")]
LAYOUTS = [(n, "contiguous") for n in FUSED] + [
    (n, "channels_last") for n in FUSED if CASES[n].kind == "batchnorm" and len(CASES[n].x) == 4
]


@contextlib.contextmanager
def cuda_fused(on):
    saved = _C.cuda_fused_kernels()
    _C.set_cuda_fused_kernels(on)
    try:
        yield
    finally:
        _C.set_cuda_fused_kernels(saved)


def test_cuda_fused_kernels_switch():
    assert _C.cuda_fused_kernels() is True  # on by default
    with cuda_fused(False):
        assert _C.cuda_fused_kernels() is False
    assert _C.cuda_fused_kernels() is True


def on_cuda(tensors):
    return [None if t is None else t.cuda() for t in tensors]


def cuda_inputs(name, layout, seed=0):
    primals, tangents, gy, rgy = in_layout(layout, *inputs_for(CASES[name], seed))
    return on_cuda(primals), on_cuda(tangents), gy.cuda(), rgy.cuda()


def assert_close(got, want, tol, what):
    for name, g, w in zip(OUTPUTS, got, want):
        assert (g is None) == (w is None), f"{what}: {name}"
        if g is not None:
            err = rel_err(g.cpu(), w.cpu())
            assert err < tol, f"{what}: {name} differs by {err:.3e}"


@needs_cuda
@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
def test_fused_cuda_rules_match_aten_twin_autograd_and_cpu(name, layout):
    case = CASES[name]
    primals, tangents, gy, rgy = cuda_inputs(name, layout)
    with cuda_fused(True):
        fused = run_op(case, primals, tangents, gy, rgy)
    with cuda_fused(False):
        twin = run_op(case, primals, tangents, gy, rgy)
    assert_close(fused, twin, TWIN_TOL, f"{name} ({layout}): fused vs ATen twin")
    want = reference(case, primals, tangents, gy, rgy)
    assert_matches(fused, want, f"{name} ({layout}) vs torch.func")
    cpu = run_op(case, *in_layout(layout, *inputs_for(case)))
    assert_close(fused, cpu, TWIN_TOL, f"{name} ({layout}): CUDA vs CPU")


@needs_cuda
@pytest.mark.parametrize("name", FUSED)
def test_fused_cuda_rules_with_absent_tangents(name):
    # An undefined tangent is an exact zero: each pattern must equal torch.func with zeros (the
    # rules choose between the fused kernels and ATen by which tangents are present).
    case = CASES[name]
    primals, tangents, gy, rgy = cuda_inputs(name, "contiguous")
    both = tangents + [rgy]
    for absent in ([0], [4], [2, 3], [0, 4], [0, 1, 2, 3, 4]):
        given = [None if i in absent else t for i, t in enumerate(both)]
        with cuda_fused(True):
            got = run_op(case, primals, given[:4], gy, given[4])
        want = reference(case, primals, given[:4], gy, given[4])
        assert_matches(got, want, f"{name} without tangents {absent}")


@needs_cuda
@pytest.mark.parametrize("name", ["bn2d", "bn1d", "tanh", "sigmoid"])
def test_fused_cuda_rules_in_float32(name):
    case = CASES[name]
    primals, tangents, gy, rgy = cuda_inputs(name, "contiguous")
    want = reference(case, primals, tangents, gy, rgy)
    f32 = lambda ts: [None if t is None else t.float() for t in ts]  # noqa: E731
    with cuda_fused(True):
        got = run_op(case, f32(primals), f32(tangents), gy.float(), rgy.float())
    assert_close([None if g is None else g.double() for g in got], want, 1e-5, f"{name} float32")


def kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(e.key for e in prof.key_averages())


@needs_cuda
def test_the_rules_launch_the_fused_kernels_only_when_on():
    # The comparisons above would pass with the twin on both sides: this one sees the launches.
    launches = {
        "bn2d": ["bn_forward_kernel", "bn_r_backward_kernel"],
        "tanh": ["r_backward_kernel"],
    }
    for name, kernels in launches.items():
        case = CASES[name]
        inputs = cuda_inputs(name, "contiguous")
        with cuda_fused(True):
            names = kernel_names(lambda: run_op(case, *inputs))
        assert all(k in names for k in kernels), (name, names)
        with cuda_fused(False):
            names = kernel_names(lambda: run_op(case, *inputs))
        assert not any(k in names for k in kernels), (name, names)


def meta_loss_and_grads(make, batch, device, fused):
    maml = make().to(device)
    with cuda_fused(fused):
        loss = maml.meta_loss(batch.to(device))
        params = list(maml.parameters())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return loss.detach().cpu(), [g.cpu() for g in grads]


@needs_cuda
@pytest.mark.parametrize("net", ["mlp-batchnorm", "conv4", "resnet12"])
@pytest.mark.parametrize("first_order", [False, True])
def test_model_aware_on_cuda_with_fused_kernels_equals_twin_and_cpu(net, first_order):
    model_fn, batch_fn = NETWORKS[net]
    make = maml_factory(
        model_fn, inner_steps=2, first_order=first_order, loss="cross_entropy",
        lr_mode="per_layer_step", learn_inner_lr=True,
    )  # fmt: skip
    batch = batch_fn("cross_entropy")
    cpu_loss, cpu_grads = meta_loss_and_grads(make, batch, "cpu", True)
    scale = max(float(g.abs().max()) for g in cpu_grads)
    for fused in (True, False):
        loss, grads = meta_loss_and_grads(make, batch, "cuda", fused)
        assert float((loss - cpu_loss).abs()) <= 1e-10 * float(cpu_loss.abs()), (net, fused)
        for g, c in zip(grads, cpu_grads):
            assert float((g - c).abs().max()) <= 1e-10 * scale, (net, fused)
