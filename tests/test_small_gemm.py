"""The model-aware core's per-task matrix product (csrc/cpu/small_gemm.h) against torch.matmul,
through the test op ``pymeta::small_gemm``, for the shapes that send it down each of its paths:
BLAS for large products; in float32 with AVX2, the register-tiled kernel (whole 8-column blocks,
masked tails, ``A Bᵀ`` through a transposed B, dot products for ``A Bᵀ`` with ragged columns);
the plain loops for the tiniest (the depth-1 outer product, matrix-vector products)."""

import pytest
import torch

import pymeta  # noqa: F401  (loads the compiled core, which registers torch.ops.pymeta)

# (m, n, k) of C = op(A) op(B): C is m x n, the products run over k.
SHAPES = [
    (10, 40, 1),  # depth 1: an outer product (the sinusoid MLP's 1-input layer)
    (10, 40, 40),  # the sinusoid MLP's 40 x 40 layer: 8-column blocks; A Bᵀ via a transposed B
    (25, 10, 128),  # mlp-128's head: 10 columns, a masked tail of 2; A Bᵀ as dot products
    (128, 10, 25),  # mlp-128's first-layer weight gradient (Aᵀ B) with its tail
    (17, 24, 5),
    (3, 17, 25),  # 2 blocks and a tail of 1
    (33, 8, 9),  # a transposed B with a ragged edge of k (9 = 8 + 1) and of rows (33)
    (9, 33, 8),
    (10, 1, 40),  # one column: matrix-vector
    (40, 1, 10),
    (1, 1, 1),
    (6, 16, 3),  # shallow, two whole blocks
    (64, 256, 256),  # large: BLAS
    (5, 8, 0),  # an empty product: zeros (or c)
]


def reference(a, b, ta, tb, c):
    op_a = a.double().t() if ta else a.double()
    op_b = b.double().t() if tb else b.double()
    out = op_a @ op_b
    return out + c.double() if c is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ta", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("tb", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["c0", "c"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SHAPES])
def test_small_gemm_matches_matmul(shape, ta, tb, accumulate, dtype):
    m, n, k = shape
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = torch.randn((k, m) if ta else (m, k), generator=g, dtype=dtype)
    b = torch.randn((n, k) if tb else (k, n), generator=g, dtype=dtype)
    c = torch.randn(m, n, generator=g, dtype=dtype) if accumulate else None
    c_before = None if c is None else c.clone()
    got = torch.ops.pymeta.small_gemm(a, b, ta, tb, c)
    want = reference(a, b, ta, tb, c)
    assert got.shape == (m, n) and got.dtype == dtype
    # Each entry against the size of the sums it adds (k products of unit-variance entries).
    scale = (k**0.5 + (1.0 if accumulate else 0.0)) or 1.0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    err = float((got.double() - want).abs().max()) if got.numel() else 0.0
    assert err <= tol * scale * 4, f"{shape} ta={ta} tb={tb} c={accumulate}: {err:.3e}"
    if c is not None:
        assert torch.equal(c, c_before)  # the op adds to a copy of c


def test_small_gemm_names_bad_arguments():
    a, b = torch.randn(3, 4), torch.randn(5, 6)
    with pytest.raises(RuntimeError, match=r"op\(a\) is 3 x 4 but op\(b\) is 5 x 6"):
        torch.ops.pymeta.small_gemm(a, b, False, False)
    with pytest.raises(RuntimeError, match=r"must both be float32 or both float64"):
        torch.ops.pymeta.small_gemm(a, torch.randn(4, 2, dtype=torch.float64), False, False)
    with pytest.raises(RuntimeError, match=r"c must be 3 x 2"):
        torch.ops.pymeta.small_gemm(a, torch.randn(4, 2), False, False, torch.randn(2, 3))
