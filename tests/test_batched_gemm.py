"""The layered core's batched matrix product (csrc/cpu/batched_gemm.h) against a float64
``torch.bmm``, through the test op ``pymeta::batched_gemm``, for operands that send it down each of
its paths: in float32, oneDNN's brgemm on row-major operands (contiguous, narrowed, batch
broadcast) in place and on column-major ones through transposed copies (8 x 8 register blocks
and ragged edges); ``at::bmm`` for overlapping rows, float64 and with the path switched off
(``pymeta._C.set_onednn_gemm``)."""

import pytest
import torch

from pymeta import _C

# (batch, m, k, n): a (batch, m, k) @ b (batch, k, n).
SHAPES = [
    (72, 40, 32, 32),  # Winograd F(4x4)'s batch of 36 points x 2 tasks
    (16, 20, 320, 320),  # F(2x2) at 320 channels, a 1-shot support pass
    (2, 80, 320, 5),  # a linear head
    (3, 13, 19, 9),  # ragged edges of the 8 x 8 transposed blocks
    (3, 1, 7, 1),
    (2, 5, 0, 4),  # an empty depth: zeros (or c)
    (2, 0, 3, 4),  # no rows
]


def operand(shape, layout, g, dtype):
    """A (batch, rows, cols) operand with the given memory layout."""
    batch, rows, cols = shape
    if layout == "contiguous":
        return torch.randn(batch, rows, cols, generator=g, dtype=dtype)
    if layout == "transposed":  # column-major: transposed copies
        return torch.randn(batch, cols, rows, generator=g, dtype=dtype).transpose(1, 2)
    if layout == "narrowed":  # row-major with a leading dimension beyond the columns
        return torch.randn(batch, rows, cols + 3, generator=g, dtype=dtype)[:, :, :cols]
    if layout == "batch_broadcast":  # one matrix for the whole batch (batch stride 0)
        return torch.randn(1, rows, cols, generator=g, dtype=dtype).expand(batch, rows, cols)
    if layout == "rows_broadcast":  # overlapping rows (row stride 0): not row-major
        return torch.randn(batch, 1, cols, generator=g, dtype=dtype).expand(batch, rows, cols)
    raise ValueError(layout)


LAYOUTS = ["contiguous", "transposed", "narrowed", "batch_broadcast", "rows_broadcast"]


@pytest.fixture(params=[True, False], ids=["onednn", "blas"])
def onednn(request):
    saved = _C.onednn_gemm()
    _C.set_onednn_gemm(request.param)
    assert _C.onednn_gemm() == request.param
    yield request.param
    _C.set_onednn_gemm(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["c0", "c"])
@pytest.mark.parametrize("layout_b", LAYOUTS)
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_batched_gemm_matches_bmm(onednn, shape, layout_a, layout_b, accumulate, dtype):
    batch, m, k, n = shape
    g = torch.Generator().manual_seed(batch * 10_000 + m * 100 + n + k)
    a = operand((batch, m, k), layout_a, g, dtype)
    b = operand((batch, k, n), layout_b, g, dtype)
    c = torch.randn(batch, m, n, generator=g, dtype=dtype) if accumulate else None
    c_before = None if c is None else c.clone()
    got = torch.ops.pymeta.batched_gemm(a, b, c)
    want = torch.bmm(a.double(), b.double()) + (c.double() if c is not None else 0.0)
    assert got.shape == (batch, m, n) and got.dtype == dtype and got.is_contiguous()
    scale = (k**0.5 + (1.0 if accumulate else 0.0)) or 1.0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    err = float((got.double() - want).abs().max()) if got.numel() else 0.0
    assert err <= tol * scale * 4, f"{shape} {layout_a} {layout_b} c={accumulate}: {err:.3e}"
    if c is not None:
        assert torch.equal(c, c_before)  # the op adds to a copy of c


def test_batched_gemm_large_transposed_operands():
    """The Winograd weight gradient's dM^T V (a column-major left operand, many 8 x 8 blocks):
    the same values as a float64 bmm to float32 rounding, and accumulated into c."""
    g = torch.Generator().manual_seed(0)
    dm = torch.randn(72, 300, 80, generator=g)  # (points x tasks, tiles, out channels)
    v = torch.randn(72, 300, 80, generator=g)
    a = dm.transpose(1, 2)
    want = torch.bmm(a.double(), v.double())
    got = torch.ops.pymeta.batched_gemm(a, v, None)
    assert float((got.double() - want).abs().max()) <= 1e-5 * 300**0.5 * 4
    acc = torch.ops.pymeta.batched_gemm(a, v, got)
    assert float((acc.double() - 2 * want).abs().max()) <= 2e-5 * 300**0.5 * 4


def test_batched_gemm_names_bad_arguments():
    a = torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"a is \[2, 3, 4\] but b is \[2, 5, 6\]"):
        torch.ops.pymeta.batched_gemm(a, torch.randn(2, 5, 6))
    with pytest.raises(RuntimeError, match=r"must be 3-d"):
        torch.ops.pymeta.batched_gemm(a[0], torch.randn(4, 2))
    with pytest.raises(RuntimeError, match=r"must both be float32 or both float64"):
        torch.ops.pymeta.batched_gemm(a, torch.randn(2, 4, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"c must be \(2, 3, 2\)"):
        torch.ops.pymeta.batched_gemm(a, torch.randn(2, 4, 2), torch.randn(2, 2, 3))
