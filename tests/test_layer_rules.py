"""Each layer kind's four rules in the layered core (forward, backward, R-forward, R-backward), on
their own, against torch.func in float64 through the test op ``pymeta::net_layer_rules``."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from parity import rel_err
from torch.func import jvp, vjp

import pymeta
from pymeta.model_aware.encoding import (
    ACTIVATIONS,
    BATCHNORM_INTS,
    CONV_INTS,
    KINDS,
    NUM_INTS,
    POOL_INTS,
    layer_ints,
    layer_row,
)  # fmt: skip

# torch.func's forward AD loads torch's own jit-scripted decompositions on first use.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

TOL = 1e-10
# The op's outputs, in order: the rules' values and their tangents.
OUTPUTS = ["y", "dx", "dx2", "dw", "db", "R{y}", "R{dx}", "R{dx2}", "R{dw}", "R{db}"]
TANGENTS = ["r_x", "r_x2", "r_weight", "r_bias", "r_grad_y"]


@dataclass
class Case:
    kind: str
    flag: int
    ints: tuple
    fn: Callable  # fn(x, x2, w, b) -> y, with None for the absent ones
    x: tuple  # shapes; None: absent
    x2: tuple | None = None
    w: tuple | None = None
    b: tuple | None = None
    arg: float = 0.0

    def row(self):
        ints = list(self.ints) + [0] * (NUM_INTS - len(self.ints))
        inputs = (0, 0) if self.x2 is not None else (0,)
        return layer_row(KINDS[self.kind], self.flag, self.w is not None, ints, inputs)


def bn_ints(channels):
    return layer_ints(BATCHNORM_INTS, per_step=0, channels=channels)


def conv_ints(stride, padding):
    return layer_ints(CONV_INTS, stride=stride, padding=padding)


def pool_ints(kernel, stride, padding):
    return layer_ints(POOL_INTS, kernel=kernel, stride=stride, padding=padding)


def conv_fn(stride, padding):
    return lambda x, x2, w, b: F.conv2d(x, w, b, stride=stride, padding=padding)


def bn_fn(eps):
    return lambda x, x2, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=eps)


def act_fn(f):
    return lambda x, x2, w, b: f(x)


def avg_fn(kernel, stride, padding, include):
    return lambda x, x2, w, b: F.avg_pool2d(x, kernel, stride, padding, count_include_pad=include)


def max_fn(kernel, stride, padding):
    return lambda x, x2, w, b: F.max_pool2d(x, kernel, stride, padding)


IMG = (3, 2, 8, 8)  # (N, C, H, W)
CASES = {
    "linear": Case(
        "linear", 1, (), lambda x, x2, w, b: F.linear(x, w, b), (5, 4), w=(3, 4), b=(3,)
    ),
    "linear-no-bias": Case("linear", 0, (), lambda x, x2, w, b: F.linear(x, w), (5, 4), w=(3, 4)),
    "conv": Case(
        "conv2d", 1, conv_ints((1, 1), (1, 1)), conv_fn(1, 1), IMG, w=(3, 2, 3, 3), b=(3,)
    ),
    "conv-no-bias": Case(
        "conv2d", 0, conv_ints((1, 1), (0, 0)), conv_fn(1, 0), IMG, w=(3, 2, 3, 3)
    ),
    # Stride 2 both ways with padding only along H, and a 3x2 kernel with stride and padding
    # differing between H and W.
    "conv-stride2-pad-h": Case(
        "conv2d", 1, conv_ints((2, 2), (1, 0)), conv_fn(2, (1, 0)), IMG, w=(3, 2, 3, 3), b=(3,)
    ),
    "conv-asymmetric": Case(
        "conv2d", 1, conv_ints((2, 1), (0, 1)), conv_fn((2, 1), (0, 1)), IMG, w=(4, 2, 3, 2), b=(4,)
    ),
    "bn1d": Case("batchnorm", 1, bn_ints(3), bn_fn(1e-5), (6, 3), w=(3,), b=(3,), arg=1e-5),
    "bn1d-no-affine": Case("batchnorm", 0, bn_ints(3), bn_fn(1e-3), (6, 3), arg=1e-3),
    "bn1d-sequence": Case(
        "batchnorm", 1, bn_ints(3), bn_fn(1e-5), (4, 3, 5), w=(3,), b=(3,), arg=1e-5
    ),
    "bn2d": Case("batchnorm", 1, bn_ints(2), bn_fn(1e-5), IMG, w=(2,), b=(2,), arg=1e-5),
    "bn2d-no-affine": Case("batchnorm", 0, bn_ints(2), bn_fn(0.1), IMG, arg=0.1),
    "relu": Case("activation", ACTIVATIONS["relu"], (), act_fn(F.relu), IMG),
    "leaky_relu": Case(
        "activation",
        ACTIVATIONS["leaky_relu"],
        (),
        act_fn(lambda x: F.leaky_relu(x, 0.2)),
        IMG,
        arg=0.2,
    ),
    # A negative slope: the one activation whose rules read its input, not its output.
    "leaky_relu-negative": Case(
        "activation",
        ACTIVATIONS["leaky_relu"],
        (),
        act_fn(lambda x: F.leaky_relu(x, -0.3)),
        IMG,
        arg=-0.3,
    ),
    "tanh": Case("activation", ACTIVATIONS["tanh"], (), act_fn(torch.tanh), IMG),
    "sigmoid": Case("activation", ACTIVATIONS["sigmoid"], (), act_fn(torch.sigmoid), (5, 4)),
    "maxpool-2-2": Case("maxpool", 0, pool_ints((2, 2), (2, 2), (0, 0)), max_fn(2, 2, 0), IMG),
    "maxpool-3-1-pad1": Case("maxpool", 0, pool_ints((3, 3), (1, 1), (1, 1)), max_fn(3, 1, 1), IMG),
    "maxpool-asymmetric": Case(
        "maxpool", 0, pool_ints((3, 2), (2, 1), (1, 0)), max_fn((3, 2), (2, 1), (1, 0)), IMG
    ),
    "avgpool-2-2": Case(
        "avgpool", 1, pool_ints((2, 2), (2, 2), (0, 0)), avg_fn(2, 2, 0, True), IMG
    ),
    "avgpool-3-1-pad1-include": Case(
        "avgpool", 1, pool_ints((3, 3), (1, 1), (1, 1)), avg_fn(3, 1, 1, True), IMG
    ),
    "avgpool-3-1-pad1-exclude": Case(
        "avgpool", 0, pool_ints((3, 3), (1, 1), (1, 1)), avg_fn(3, 1, 1, False), IMG
    ),
    "avgpool-3-2-pad1-exclude": Case(
        "avgpool", 0, pool_ints((3, 3), (2, 2), (1, 1)), avg_fn(3, 2, 1, False), (2, 2, 7, 7)
    ),
    "flatten": Case("flatten", 0, (), lambda x, x2, w, b: x.flatten(1), IMG),
    "add": Case("add", 0, (), lambda x, x2, w, b: x + x2, IMG, x2=IMG),
    "concat": Case(
        "concat", 0, (), lambda x, x2, w, b: torch.cat([x, x2], 1), IMG, x2=(3, 3, 8, 8)
    ),
    "concat-2d": Case(
        "concat", 0, (), lambda x, x2, w, b: torch.cat([x, x2], 1), (5, 4), x2=(5, 2)
    ),
    "global_avgpool": Case(
        "global_avgpool", 0, (), lambda x, x2, w, b: x.mean((2, 3), keepdim=True), IMG
    ),
}
FOUR_D = [name for name, c in CASES.items() if len(c.x) == 4]


def inputs_for(case, seed=0):
    """Random primals (x, x2, w, b), tangents (r_x, r_x2, r_weight, r_bias) and gy, r_grad_y."""
    g = torch.Generator().manual_seed(seed)

    def rand(shape):
        return None if shape is None else torch.randn(shape, generator=g, dtype=torch.float64)

    shapes = [case.x, case.x2, case.w, case.b]
    primals, tangents = [rand(s) for s in shapes], [rand(s) for s in shapes]
    y = case.fn(*primals)
    return primals, tangents, rand(y.shape), rand(y.shape)


def reference(case, primals, tangents, gy, rgy):
    """The ten outputs by torch.func: R{.} is the jvp of (y, vjp(gy)) along the tangents, with
    absent tangents as zeros."""
    present = [i for i, p in enumerate(primals) if p is not None]

    def with_present(values):
        full = [None] * 4
        for i, v in zip(present, values):
            full[i] = v
        return full

    def value_and_grads(*args):
        y, pullback = vjp(lambda *ps: case.fn(*with_present(ps)), *args[:-1])
        return y, pullback(args[-1])

    def or_zeros(t, like):
        return torch.zeros_like(like) if t is None else t

    args = tuple(primals[i] for i in present) + (gy,)
    dirs = tuple(or_zeros(tangents[i], primals[i]) for i in present) + (or_zeros(rgy, gy),)
    (y, grads), (ry, rgrads) = jvp(value_and_grads, args, dirs)
    return [y, *with_present(grads), ry, *with_present(rgrads)]


def run_op(case, primals, tangents, gy, rgy):
    x, x2, w, b = primals
    return torch.ops.pymeta.net_layer_rules(case.row(), case.arg, x, x2, w, b, gy, *tangents, rgy)


def assert_matches(got, want, what):
    for name, g, w in zip(OUTPUTS, got, want):
        if w is None:  # an absent input: the op returns no gradient for it
            assert g is None, f"{what}: {name} should be absent"
            continue
        assert g is not None, f"{what}: {name} is missing"
        assert g.shape == w.shape, f"{what}: {name} has shape {tuple(g.shape)}, expected {w.shape}"
        err = rel_err(g, w)
        assert err < TOL, f"{what}: {name} relative error {err:.3e}"


def check(case, primals, tangents, gy, rgy, what):
    assert_matches(
        run_op(case, primals, tangents, gy, rgy), reference(case, primals, tangents, gy, rgy), what
    )


@contextmanager
def cpu_fast_paths(paths):
    """The CPU fast paths (channels_last, fused_kernels, gemm_weight_grads, winograd) set to paths,
    restored after."""
    saved = pymeta._C.cpu_fast_paths()
    pymeta._C.set_cpu_fast_paths(*paths)
    try:
        assert pymeta._C.cpu_fast_paths() == paths
        yield
    finally:
        pymeta._C.set_cpu_fast_paths(*saved)


@pytest.fixture(
    params=[
        (True, True, True, True),
        (True, True, False, True),
        (True, True, True, False),
        (False, False, False, False),
    ],
    ids=["fast", "fast-onednn-weight-grads", "fast-no-winograd", "aten"],
)
def fast_paths(request):
    # The CPU fast paths on and off. Of the two, the rules read only the fused kernels' switch
    # (batch norm over 2-D or channels-last 4-D inputs); channels-last conversion happens in
    # the core's driver, so the layouts are chosen by the tests here.
    with cpu_fast_paths(request.param):
        yield request.param


def in_layout(layout, primals, tangents, gy, rgy):
    """The inputs in a memory layout: "channels_last" makes every 4-D tensor channels-last (as the
    core's CPU path keeps images), "mixed" only x and x2 (the op's other operands stay dense)."""

    def cl(t):
        if t is None or t.dim() != 4:
            return t
        return t.contiguous(memory_format=torch.channels_last)

    if layout == "contiguous":
        return primals, tangents, gy, rgy
    x, x2, w, b = primals
    primals = [cl(x), cl(x2), w, b]
    if layout == "mixed":
        return primals, tangents, gy, rgy
    return primals, [cl(t) for t in tangents], cl(gy), cl(rgy)


LAYOUTS = [(name, "contiguous") for name in CASES] + [
    (name, layout) for name in FOUR_D for layout in ("channels_last", "mixed")
]


@pytest.mark.parametrize(("name", "layout"), LAYOUTS)
def test_rules_match_autograd(name, layout, fast_paths):
    case = CASES[name]
    inputs = in_layout(layout, *inputs_for(case))
    assert layout == "contiguous" or inputs[0][0].is_contiguous(memory_format=torch.channels_last)
    check(case, *inputs, f"{name} ({layout})")


ABSENT = [(name, "contiguous") for name in CASES] + [
    (name, "channels_last") for name in FOUR_D if CASES[name].kind == "batchnorm"
]


@pytest.mark.parametrize(("name", "layout"), ABSENT)
def test_absent_tangents_are_zero_tangents(name, layout, fast_paths):
    # None is the core's "exact zero": each tangent absent on its own, then all of them, must
    # give what zero tangents give (the batch-norm rules switch kernels on which are present).
    case = CASES[name]
    primals, tangents, gy, rgy = in_layout(layout, *inputs_for(case))
    both = tangents + [rgy]
    # A weight tangent without the bias tangent (and the reverse) is
    # test_weight_tangent_without_bias_tangent below.
    patterns = [[i] for i, t in enumerate(both) if t is not None and (i < 2 or i == 4)]
    patterns += [[2, 3], [0, 1, 2, 3, 4]]
    for absent in patterns:
        given = [None if i in absent else t for i, t in enumerate(both)]
        what = f"{name} ({layout}) without {', '.join(TANGENTS[i] for i in absent)}"
        got = run_op(case, primals, given[:4], gy, given[4])
        assert_matches(got, reference(case, primals, given[:4], gy, given[4]), what)
        zeros = [None if t is None else torch.zeros_like(t) for t in both]
        given_zeros = [z if i in absent else t for i, (t, z) in enumerate(zip(both, zeros))]
        with_zeros = run_op(case, primals, given_zeros[:4], gy, given_zeros[4])
        for out, g, z in zip(OUTPUTS, got, with_zeros):
            assert (g is None) == (z is None), f"{what}: {out}"
            if g is not None:
                err = rel_err(g, z)
                assert err < TOL, f"{what}: {out} differs from zero tangents by {err:.3e}"


@pytest.mark.parametrize(
    ("name", "absent"),
    [("linear", 2), ("conv", 2), ("bn2d", 2), ("bn2d", 3)],
    ids=["linear-no-r_weight", "conv-no-r_weight", "bn2d-no-r_weight", "bn2d-no-r_bias"],
)
def test_weight_tangent_without_bias_tangent(name, absent):
    # The rules' contract is "undefined means zero" for each tangent on its own. The ATen
    # R-forward of Linear, Conv2d and batch norm once added the bias tangent only with a weight
    # tangent, and batch norm read ub whenever uw was given (the core's own direction() gives
    # both or neither, so only this op could reach it).
    case = CASES[name]
    primals, tangents, gy, rgy = inputs_for(case)
    tangents[absent] = None
    with cpu_fast_paths((False, False, False, False)):
        check(case, primals, tangents, gy, rgy, f"{name} without {TANGENTS[absent]}")


def test_the_comparison_tells_max_from_average_pooling():
    # The parity above can fail: the max-pooling reference against the op run as average pooling
    # (the same ints, another kind code) differs far beyond the tolerance.
    case = CASES["maxpool-2-2"]
    primals, tangents, gy, rgy = inputs_for(case)
    avg = Case("avgpool", 1, case.ints, case.fn, case.x)
    got = run_op(avg, primals, tangents, gy, rgy)
    want = reference(case, primals, tangents, gy, rgy)
    assert rel_err(got[0], want[0]) > 0.1
    with pytest.raises(AssertionError, match="relative error"):
        assert_matches(got, want, "avgpool as maxpool")
    assert_matches(run_op(case, primals, tangents, gy, rgy), want, "maxpool")


@pytest.mark.parametrize(("name", "layout"), [("bn1d", "contiguous"), ("bn2d", "channels_last")])
def test_the_fast_paths_reach_the_fused_batch_norm_kernels(name, layout):
    # The "fast" runs above test the fused kernels only if these inputs reach them: their sums
    # round differently from ATen's, so the outputs differ in the last bits.
    case = CASES[name]
    inputs = in_layout(layout, *inputs_for(case))
    runs = []
    for paths in [(True, True, True, True), (False, False, False, False)]:
        with cpu_fast_paths(paths):
            runs.append(run_op(case, *inputs))
    assert any(not torch.equal(a, b) for a, b in zip(*runs) if a is not None)


# ----------------------------------------------------------------------------- task-batched
def fold(per_task):
    """Per-task values (N, C, ...) of T tasks -> the task-batched layout (N, T*C, ...)."""
    return torch.stack(per_task, 1).flatten(1, 2)


@pytest.mark.parametrize("name", list(CASES))
def test_task_batched_rules_equal_the_rules_per_task(name, fast_paths):
    """The rules on three tasks at once (values folded along dim 1, params with a leading task
    dim) give each task's own results, task by task."""
    case, tasks = CASES[name], 3
    per_task = [inputs_for(case, seed=10 + t) for t in range(tasks)]
    want = [run_op(case, *inputs) for inputs in per_task]

    def batched(part, i):  # values (x, x2) folded, params (w, b) stacked
        if per_task[0][part][i] is None:
            return None
        return (fold if i < 2 else torch.stack)([pt[part][i] for pt in per_task])

    primals = [batched(0, i) for i in range(4)]
    tangents = [batched(1, i) for i in range(4)]
    gy, rgy = fold([pt[2] for pt in per_task]), fold([pt[3] for pt in per_task])
    x, x2, w, b = primals
    got = torch.ops.pymeta.net_layer_rules(
        case.row(), case.arg, x, x2, w, b, gy, *tangents, rgy, tasks=tasks
    )  # fmt: skip
    for k, out_name in enumerate(OUTPUTS):
        if want[0][k] is None:
            assert got[k] is None, out_name
            continue
        is_param = out_name in ("dw", "db", "R{dw}", "R{db}")
        expected = (torch.stack if is_param else fold)([w_t[k] for w_t in want])
        assert got[k].shape == expected.shape, (out_name, got[k].shape, expected.shape)
        assert rel_err(got[k], expected) < 1e-13, out_name


def test_task_batched_rules_check_the_task_dim():
    case = CASES["conv"]
    (x, _, w, b), tangents, gy, rgy = inputs_for(case)
    with pytest.raises(
        RuntimeError, match=r"with tasks = 2, weight and bias must have a leading dim"
    ):
        torch.ops.pymeta.net_layer_rules(
            case.row(), case.arg, x, None, w, b, gy, *tangents, rgy, tasks=2
        )


# ------------------------------------------------- convolution weight gradients by matrix products
def conv_case(n, channels, out, size, kernel, stride=1, padding=1):
    ints = conv_ints((stride, stride), (padding, padding))
    return Case(
        "conv2d", 1, ints, conv_fn(stride, padding), (n, channels, size, size),
        w=(out, channels, kernel, kernel), b=(out,),
    )  # fmt: skip


# (case, whether the core's shape rule takes the matrix-product path): kernels beyond 1x1 with
# deep patches (C * kh * kw >= 720) and few output positions (N * Ho * Wo <= 320) or maps of
# 4x4 or less; the rest stays with oneDNN.
WEIGHT_GRAD_PATHS = {
    "few-positions": (conv_case(3, 80, 3, 8, 3), True),
    "few-positions-stride2": (conv_case(4, 80, 6, 9, 3, stride=2), True),
    "4x4-many-images": (conv_case(30, 120, 4, 4, 3), True),
    "few-positions-shallow": (conv_case(3, 2, 3, 8, 3), False),
    "1x1-kernel": (conv_case(4, 800, 6, 9, 1, stride=2, padding=0), False),
    "many-positions": (conv_case(8, 80, 3, 12, 3), False),
    "4x4-shallow-patches": (conv_case(30, 8, 4, 4, 3), False),
}


@pytest.mark.parametrize("name", list(WEIGHT_GRAD_PATHS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("tasks", [1, 2])
def test_conv_weight_gradients_by_either_path_match_autograd(name, layout, tasks):
    """The weight gradient and its tangent by matrix products (the fast path) or by the library's
    kernels (switched off): both match autograd, per task, and the shape rule picks the path
    (the two differ in the last bits exactly where it takes the matrix products)."""
    case, by_gemm = WEIGHT_GRAD_PATHS[name]
    per_task = [in_layout(layout, *inputs_for(case, seed=20 + t)) for t in range(tasks)]
    runs = {}
    for gemm in (True, False):
        with cpu_fast_paths((True, True, gemm, False)):
            for t, inputs in enumerate(per_task):
                check(case, *inputs, f"{name} ({layout}, task {t}, gemm path {gemm})")
            if tasks == 1:
                runs[gemm] = run_op(case, *per_task[0])
            else:  # the task-batched layout: values folded along dim 1, params stacked
                x, w, b, rx, uw, ub = (
                    (fold if i == 0 else torch.stack)([pt[part][i] for pt in per_task])
                    for part, i in ((0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3))
                )
                gy, rgy = (fold([pt[i] for pt in per_task]) for i in (2, 3))
                got = torch.ops.pymeta.net_layer_rules(
                    case.row(), case.arg, x, None, w, b, gy, rx, None, uw, ub, rgy, tasks=tasks
                )
                for k, out_name in enumerate(OUTPUTS):
                    if out_name in ("dw", "R{dw}"):
                        want = torch.stack([run_op(case, *pt)[k] for pt in per_task])
                        assert rel_err(got[k], want) < 1e-13, (out_name, gemm)
                runs[gemm] = got
    weight_outputs = [OUTPUTS.index("dw"), OUTPUTS.index("R{dw}")]
    same = all(torch.equal(runs[True][k], runs[False][k]) for k in weight_outputs)
    assert same != by_gemm, f"{name}: expected the {'matrix-product' if by_gemm else 'oneDNN'} path"
    # The other outputs never take the matrix-product path.
    for k, out_name in enumerate(OUTPUTS):
        if k not in weight_outputs and runs[True][k] is not None:
            assert torch.equal(runs[True][k], runs[False][k]), out_name


# ------------------------------------------ Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions
# (case, the output block the core's shape rule picks: 4, 2, or 0 for oneDNN): 3x3 kernels,
# stride 1, padding 1, channels-last values. F(4x4) from 32 channels in and out per task with at
# least 64 of its 4x4 blocks per task, F(2x2) from 48 channels; both where their blocks cover the
# map with little waste. "many-tiles" takes several chunks of products.
WINOGRAD_PATHS = {
    "80-channels": (conv_case(3, 80, 80, 6, 3), 2),
    "odd-map-more-out": (conv_case(2, 80, 96, 5, 3), 2),
    "one-block-map": (conv_case(2, 80, 80, 2, 3), 2),
    "odd-channels": (conv_case(1, 81, 80, 4, 3), 2),
    "many-tiles": (conv_case(8, 80, 80, 12, 3), 4),
    "4x4-blocks-narrow": (conv_case(4, 32, 40, 16, 3), 4),
    "4x4-blocks-odd-map": (conv_case(8, 33, 32, 11, 3), 4),
    "4x4-blocks-many-tiles": (conv_case(12, 32, 32, 20, 3), 4),
    "few-4x4-blocks-narrow": (conv_case(3, 32, 32, 16, 3), 0),
    "48-channels": (conv_case(2, 48, 48, 6, 3), 2),
    "narrow-in": (conv_case(2, 47, 48, 6, 3), 0),
    "narrow-out": (conv_case(2, 80, 8, 6, 3), 0),
    "3x3-map": (conv_case(2, 80, 80, 3, 3), 0),
    "1x1-map": (conv_case(2, 80, 80, 1, 3), 0),
    "stride-2": (conv_case(2, 80, 80, 6, 3, stride=2), 0),
    "no-padding": (conv_case(2, 80, 80, 6, 3, padding=0), 0),
    "5x5-kernel": (conv_case(2, 80, 80, 6, 5, padding=2), 0),
}
# The outputs that go through a convolution (the bias gradients are sums in either path).
CONV_OUTPUTS = ["y", "dx", "dw", "R{y}", "R{dx}", "R{dw}"]


@contextmanager
def winograd_blocks(block):
    """The Winograd path's output block forced to block (2 or 4; 0: by shape), restored after."""
    saved = pymeta._C.winograd_blocks()
    pymeta._C.set_winograd_blocks(block)
    try:
        yield
    finally:
        pymeta._C.set_winograd_blocks(saved)


def test_winograd_block_rule_is_the_cores():
    for name, (case, block) in WINOGRAD_PATHS.items():
        n, c, h, w = case.x
        o, _, kh, _ = case.w
        if kh == 3 and name not in ("stride-2", "no-padding"):
            assert pymeta._C.winograd_block_by_shape(n, c, o, h, w) == block, name
    with pytest.raises(ValueError, match="block: expected 0 .by shape., 2 or 4, received 3"):
        pymeta._C.set_winograd_blocks(3)
    assert pymeta._C.winograd_blocks() == 0


@pytest.mark.parametrize("name", list(WINOGRAD_PATHS))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("tasks", [1, 2])
def test_conv_by_winograd_or_onednn_matches_autograd(name, layout, tasks):
    """Every output of a convolution's rules by Winograd's F(2x2, 3x3) or F(4x4, 3x3) (the fast
    path: the block by shape, and each block forced) or by oneDNN (switched off) matches autograd,
    per task and task-batched, and the shape rule picks the path: the path by shape gives
    exactly the forced block's results, which differ in the last bits from oneDNN's exactly where
    it takes Winograd's (channels-last values only)."""
    case, block = WINOGRAD_PATHS[name]
    per_task = [in_layout(layout, *inputs_for(case, seed=30 + t)) for t in range(tasks)]
    # Values in the channels-last layout only.
    if not per_task[0][0][0].is_contiguous(memory_format=torch.channels_last):
        block = 0
    runs = {}
    # (winograd on, block): oneDNN, the block by shape, each block forced.
    for winograd, forced in ((False, 0), (True, 0), (True, 2), (True, 4)):
        with cpu_fast_paths((True, True, True, winograd)), winograd_blocks(forced):
            what = f"{name} ({layout}, winograd {winograd}, block {forced})"
            for t, inputs in enumerate(per_task):
                check(case, *inputs, f"{what}, task {t}")
            if tasks == 1:
                runs[winograd, forced] = run_op(case, *per_task[0])
                continue
            x, w, b, rx, uw, ub = (
                (fold if i == 0 else torch.stack)([pt[part][i] for pt in per_task])
                for part, i in ((0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3))
            )
            if layout == "channels_last":  # as the core keeps its values
                x, rx = (v.contiguous(memory_format=torch.channels_last) for v in (x, rx))
            gy, rgy = (fold([pt[i] for pt in per_task]) for i in (2, 3))
            got = torch.ops.pymeta.net_layer_rules(
                case.row(), case.arg, x, None, w, b, gy, rx, None, uw, ub, rgy, tasks=tasks
            )
            for k, out_name in enumerate(OUTPUTS):
                if got[k] is None or out_name in ("dx2", "R{dx2}"):
                    continue
                parts = [run_op(case, *pt)[k] for pt in per_task]
                want = (
                    fold(parts) if out_name in ("y", "dx", "R{y}", "R{dx}") else torch.stack(parts)
                )
                assert rel_err(got[k], want) < 1e-13, (out_name, what)
            runs[winograd, forced] = got
    chosen = runs[False, 0] if block == 0 else runs[True, block]
    for out_name in CONV_OUTPUTS:
        k = OUTPUTS.index(out_name)
        by_shape = runs[True, 0][k]
        assert torch.equal(by_shape, chosen[k]), f"{name} {out_name}: expected block {block}"
        assert torch.equal(by_shape, runs[False, 0][k]) == (block == 0), (
            f"{name} {out_name}: expected {'oneDNN' if block == 0 else 'Winograd'}"
        )
