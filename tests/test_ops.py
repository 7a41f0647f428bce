"""sgd_update: parity with the pure-PyTorch twin, gradcheck/gradgradcheck, opcheck, bad input."""

import pytest
import torch
from parity import rel_err

import pymeta
from pymeta import reference

SHAPES = [(3, 4, 5), (3, 5), (3, 2, 3, 3)]


def make(shapes, dtype, device, layout, requires_grad=False, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(shape):
        return (
            torch.randn(shape, generator=g, dtype=torch.float64)
            .to(device, dtype)
            .requires_grad_(requires_grad)
        )

    params = [rnd(s) for s in shapes]
    grads = [rnd(s) for s in shapes]
    if layout == "scalar":
        lrs = [rnd(())] if shared else [rnd(()) for _ in shapes]
    elif layout == "per_element":
        lrs = [rnd(s[1:]) for s in shapes]
    else:
        lrs = [rnd(s) for s in shapes]
    return params, grads, lrs


LAYOUTS = ["scalar", "per_element", "per_task_element"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_matches_reference(device, layout, dtype):
    params, grads, lrs = make(SHAPES, dtype, device, layout)
    out = torch.ops.pymeta.sgd_update(params, grads, lrs)
    ref = reference.sgd_update(params, grads, lrs)
    tol = {torch.float64: 1e-15, torch.float32: 1e-6}.get(dtype, 1e-2)
    for o, r, p in zip(out, ref, params):
        assert o.shape == p.shape and o.dtype == dtype
        assert rel_err(o.double(), r.double()) < tol


def test_shared_scalar_lr_and_t1(device):
    params, grads, lrs = make([(1, 7), (1, 2, 2)], torch.float64, device, "scalar", shared=True)
    out = torch.ops.pymeta.sgd_update(params, grads, lrs)
    for o, p, g in zip(out, params, grads):
        torch.testing.assert_close(o, p - lrs[0] * g, rtol=1e-15, atol=1e-15)


def test_non_contiguous_inputs(device):
    base = torch.randn(4, 6, 5, dtype=torch.float64, device=device)
    p = base.transpose(1, 2)  # (4, 5, 6), non-contiguous
    g = torch.randn(4, 6, 5, dtype=torch.float64, device=device).transpose(1, 2)
    lr = torch.randn(6, 5, dtype=torch.float64, device=device).t()  # per element, non-contiguous
    assert not p.is_contiguous() and not lr.is_contiguous()
    (out,) = torch.ops.pymeta.sgd_update([p], [g], [lr])
    torch.testing.assert_close(out, p - lr * g, rtol=0, atol=1e-15)


def test_empty_tensors(device):
    p = torch.zeros(0, 3, dtype=torch.float64, device=device)
    (out,) = torch.ops.pymeta.sgd_update([p], [p.clone()], [torch.tensor(0.1, dtype=torch.float64)])
    assert out.shape == (0, 3)
    (out,) = torch.ops.pymeta.sgd_update(
        [torch.zeros(2, 0)], [torch.zeros(2, 0)], [torch.tensor(1.0)]
    )
    assert out.shape == (2, 0)


def _flat_op(n, n_lrs):
    def f(*args):
        return tuple(
            torch.ops.pymeta.sgd_update(list(args[:n]), list(args[n : 2 * n]), list(args[2 * n :]))
        )

    return f


@pytest.mark.parametrize(
    "layout, shared", [(layout, False) for layout in LAYOUTS] + [("scalar", True)]
)
def test_gradcheck_and_gradgradcheck(layout, shared):
    params, grads, lrs = make([(2, 3, 2), (2, 3)], torch.float64, "cpu", layout, True, shared)
    inputs = (*params, *grads, *lrs)
    f = _flat_op(len(params), len(lrs))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_backward_op_matches_reference_and_is_twice_differentiable():
    params, grads, lrs = make([(2, 3), (2, 2, 2)], torch.float64, "cpu", "per_element", True)
    outs = [torch.randn_like(g, requires_grad=True) for g in grads]
    got = torch.ops.pymeta.sgd_update_backward(grads, outs, lrs, True)
    want = reference.sgd_update_backward(grads, outs, lrs, True)
    for a, b in zip([*got[0], *got[1]], [*want[0], *want[1]]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    _, no_lr = torch.ops.pymeta.sgd_update_backward(grads, outs, lrs, False)
    assert no_lr == []

    def f(*args):
        gg, gl = torch.ops.pymeta.sgd_update_backward(
            list(args[0:2]), list(args[2:4]), list(args[4:6]), True
        )
        return (*gg, *gl)

    inputs = (*grads, *outs, *lrs)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    params, grads, lrs = make([(2, 3), (2, 4, 2)], torch.float32, "cpu", layout, True)
    torch.library.opcheck(torch.ops.pymeta.sgd_update.default, (params, grads, lrs))
    torch.library.opcheck(
        torch.ops.pymeta.sgd_update_backward.default,
        (
            [g.detach() for g in grads],
            [p.detach() for p in params],
            [lr.detach() for lr in lrs],
            True,
        ),
    )


def test_public_wrapper_accepts_float_lr_and_matches_op():
    params, grads, _ = make(SHAPES, torch.float64, "cpu", "scalar")
    out = pymeta.ops.sgd_update(params, grads, 0.5)
    for o, p, g in zip(out, params, grads):
        torch.testing.assert_close(o, p - 0.5 * g, rtol=1e-15, atol=1e-15)


def test_torch_compile_traces_the_op():
    params, grads, lrs = make(SHAPES, torch.float32, "cpu", "per_element")

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(ps, gs, ls):
        return torch.ops.pymeta.sgd_update(ps, gs, ls)

    for a, b in zip(step(params, grads, lrs), reference.sgd_update(params, grads, lrs)):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input
def _ok():
    return make([(2, 3)], torch.float64, "cpu", "scalar")


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda p, g, lr: ([], g, lr), ValueError, r"params: expected at least one"),
        (lambda p, g, lr: (p, g + g, lr), ValueError, r"grads: expected 1 tensors"),
        (
            lambda p, g, lr: (p, [torch.zeros(2, 4, dtype=torch.float64)], lr),
            ValueError,
            r"grads\[0\]: expected shape \(2, 3\)",
        ),
        (
            lambda p, g, lr: (p, [g[0].float()], lr),
            TypeError,
            r"grads\[0\]: expected dtype torch.float64",
        ),
        (
            lambda p, g, lr: (p, g, [torch.zeros(5, dtype=torch.float64)]),
            ValueError,
            r"lr: expected shape \(\), \(3,\)",
        ),
        (
            lambda p, g, lr: ([p[0].long()], g, lr),
            TypeError,
            r"params\[0\]: expected a floating-point",
        ),
        (
            lambda p, g, lr: (
                [torch.tensor(1.0, dtype=torch.float64)],
                [torch.tensor(1.0, dtype=torch.float64)],
                lr,
            ),
            ValueError,
            r"params\[0\]: expected shape \(T, \.\.\.\)",
        ),
        (lambda p, g, lr: (p, g, "fast"), TypeError, r"lr: expected a float"),
    ],
)
def test_public_wrapper_bad_input(mutate, exc, match):
    p, g, lr = mutate(*_ok())
    with pytest.raises(exc, match=match):
        pymeta.ops.sgd_update(p, g, lr)


def test_raw_op_checks_name_the_argument():
    p, g, lr = _ok()
    with pytest.raises(
        RuntimeError, match=r"pymeta::sgd_update: grads\[0\] must have shape \[2, 3\]"
    ):
        torch.ops.pymeta.sgd_update(p, [torch.zeros(3, 2, dtype=torch.float64)], lr)
    with pytest.raises(RuntimeError, match=r"expected 1 lr or one per param"):
        torch.ops.pymeta.sgd_update(p + p, g + g, lr * 3)
    with pytest.raises(RuntimeError, match=r"lr for params\[0\] must have shape"):
        torch.ops.pymeta.sgd_update(p, g, [torch.zeros(7, dtype=torch.float64)])


def test_output_keeps_the_gradient_layout_without_copies():
    # Under vmap, autograd returns transposed weight gradients; the kernel walks them as they are.
    p = (
        torch.randn(5, 6, dtype=torch.float64).unsqueeze(0).expand(4, 5, 6)
    )  # an expanded meta-param
    g = torch.randn(4, 6, 5, dtype=torch.float64).transpose(1, 2)
    (out,) = torch.ops.pymeta.sgd_update([p], [g], [torch.tensor(0.1, dtype=torch.float64)])
    assert out.stride() == g.stride()
    torch.testing.assert_close(out, p - 0.1 * g, rtol=1e-15, atol=1e-15)


def test_backward_skips_what_is_not_needed():
    """A fixed lr and first-order grads: the update's backward is the identity, no kernel runs."""
    p = torch.randn(3, 4, requires_grad=True)
    g = torch.randn(3, 4)
    lr = torch.tensor(0.1)
    with torch.profiler.profile() as prof:
        torch.ops.pymeta.sgd_update([p], [g], [lr])[0].sum().backward()
    names = {e.name for e in prof.events()}
    assert "pymeta::sgd_update_backward" not in names
    torch.testing.assert_close(p.grad, torch.ones(3, 4))
