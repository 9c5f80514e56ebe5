"""The Gram-matrix identities against dense float64 computations."""

import pytest
import torch

from nan_peft.gram import SYMMETRIC_MIN_ROWS, gram_inner_products, gram_of_pieces, low_rank_svd, pad_rank, tail_energy, truncate_low_rank, wide_svd


def stacked(ranks, m, n, seed=0, batch=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, sum(ranks), n, generator=g, dtype=torch.float64)
    B = torch.randn(*batch, m, sum(ranks), generator=g, dtype=torch.float64)
    return A, B


def dense_terms(A, B, ranks):
    bounds = torch.tensor([0, *ranks]).cumsum(0).tolist()
    return [B[..., :, lo:hi] @ A[..., lo:hi, :] for lo, hi in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("ranks,m,n", [((4,), 16, 9), ((2, 5, 3), 7, 30), ((8, 8), 3, 5), ((1, 1, 1, 1), 1, 64)])
def test_gram_inner_products_equal_dense(ranks, m, n):
    A, B = stacked(ranks, m, n)
    terms = dense_terms(A, B, ranks)
    expected = torch.tensor([[float((ti * tj).sum()) for tj in terms] for ti in terms], dtype=torch.float64)
    torch.testing.assert_close(gram_inner_products(A, B, ranks), expected, rtol=1e-12, atol=1e-10)


def test_gram_inner_products_batched_equals_each():
    ranks = (3, 2)
    A, B = stacked(ranks, 6, 11, batch=(5,))
    batched = gram_inner_products(A, B, ranks)
    for g in range(5):
        torch.testing.assert_close(batched[g], gram_inner_products(A[g], B[g], ranks), rtol=1e-13, atol=0)


@pytest.mark.parametrize("R,m,n", [(6, 20, 30), (12, 5, 40), (12, 40, 5), (3, 3, 3)])
def test_low_rank_svd_matches_dense_svd(R, m, n):
    A, B = stacked((R,), m, n, seed=R + m)
    L, S, Rt = low_rank_svd(B, A)
    dense = B @ A
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[: S.shape[0]], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(L @ torch.diag(S) @ Rt, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(L.T @ L, torch.eye(S.shape[0], dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 3, 7, 10, 16])
def test_truncate_low_rank_is_eckart_young_optimum(rank):
    A, B = stacked((4, 6), 25, 18, seed=3)
    dense = B @ A
    U, S, Vh = torch.linalg.svd(dense)
    best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    B_r, A_r, S_ours = truncate_low_rank(B, A, rank)
    assert B_r.shape == (25, rank) and A_r.shape == (rank, 18)
    torch.testing.assert_close(B_r @ A_r, best, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tail_energy(S_ours, rank), torch.linalg.norm(dense - best), rtol=1e-9, atol=1e-9)


def test_truncation_is_deterministic_and_sign_canonical():
    A, B = stacked((5, 5), 12, 13, seed=9)
    first = truncate_low_rank(B, A, 4)
    flipped = truncate_low_rank(-B, -A, 4)  # same product, factors of opposite sign
    for x, y in zip(first, flipped):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)


def test_pad_rank_keeps_product():
    A, B = stacked((3,), 4, 5)
    B_p, A_p = pad_rank(B, A, 7)
    assert B_p.shape == (4, 7) and A_p.shape == (7, 5)
    torch.testing.assert_close(B_p @ A_p, B @ A)
    with pytest.raises(ValueError):
        pad_rank(B, A, 2)



@pytest.mark.parametrize("R", [SYMMETRIC_MIN_ROWS - 1, SYMMETRIC_MIN_ROWS, 301])
def test_gram_of_pieces_is_the_full_product_and_symmetric(R):
    """Summed over pieces, on the upper triangle by row panels (R >= SYMMETRIC_MIN_ROWS, R = 301 leaving a short
    last panel) or whole: X X^T to float64 rounding, exactly symmetric where mirrored."""
    X = torch.randn(2, R, 90, generator=torch.Generator().manual_seed(R), dtype=torch.float64)
    G = gram_of_pieces((X[..., i : i + 40] for i in range(0, 90, 40)), torch.zeros(2, R, R, dtype=torch.float64))
    torch.testing.assert_close(G, X @ X.mT, rtol=1e-13, atol=1e-12)
    if R >= SYMMETRIC_MIN_ROWS:
        off = G - G.mT
        assert float(off.abs().max()) < 1e-12  # the diagonal blocks come from one product each: symmetric to rounding

@pytest.mark.parametrize("max_batch_bytes", [8, 8 * 5, 1])
def test_tiny_batch_buffer_gives_the_same_numbers(max_batch_bytes):
    """A buffer smaller than one column of a stack (G * R float64 values; here R = 16 + 3) used to crash
    stacked_chunks with a RuntimeError; the pieces are now at least one column. The Grams and the svd merge
    equal the default batching's (to float64 summation order) and the dense float64 references."""
    from nan_peft import LoraAdapter, LoraModule, merge_adapters, update_gram
    from nan_peft.combination import combine

    g = torch.Generator().manual_seed(3)
    shapes = {"x": (32, 24), "y": (32, 24), "z": (7, 40)}
    ranks = ((16, 3), (16, 3), (5, 2))
    adapters = [
        LoraAdapter(name, "", {}, {
            path: LoraModule(torch.randn(r[k], n, generator=g, dtype=torch.float64), torch.randn(m, r[k], generator=g, dtype=torch.float64), 0.5 + k)
            for (path, (m, n)), r in zip(shapes.items(), ranks)
        })
        for k, name in enumerate("ab")
    ]
    tiny, whole = update_gram(adapters, max_batch_bytes=max_batch_bytes), update_gram(adapters)
    torch.testing.assert_close(tiny.inner, whole.inner, rtol=1e-13, atol=0)
    for m_, path in enumerate(whole.modules):
        deltas = [a.modules[path].scale * a.modules[path].B @ a.modules[path].A for a in adapters]
        expected = torch.tensor([[float((di * dj).sum()) for dj in deltas] for di in deltas], dtype=torch.float64)
        torch.testing.assert_close(tiny.inner[m_], expected, rtol=1e-12, atol=1e-10)

    weights, rank = [0.7, -0.4], 6
    result = merge_adapters(adapters, coefficients=weights, combine="svd", rank=rank, dtype=torch.float64)
    args = (result.sources, result.coefficients, result.gram, "svd", rank)
    merged, report = combine(*args, dtype=torch.float64, max_batch_bytes=max_batch_bytes)
    default, default_report = combine(*args, dtype=torch.float64)
    for path in shapes:
        product = merged[path].B @ merged[path].A
        torch.testing.assert_close(product, default[path].B @ default[path].A, rtol=1e-12, atol=1e-12)
        dense = sum(w * a.modules[path].scale * a.modules[path].B @ a.modules[path].A for w, a in zip(weights, adapters))
        U, S, Vh = torch.linalg.svd(dense)
        torch.testing.assert_close(product, (U[:, :rank] * S[:rank]) @ Vh[:rank], rtol=1e-9, atol=1e-9)
    assert [(r.module, r.rank) for r in report] == [(r.module, r.rank) for r in default_report]
    for r, d in zip(report, default_report):
        assert r.norm == pytest.approx(d.norm, rel=1e-12) and r.discarded == pytest.approx(d.discarded, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("a,b", [(20, 4000), (4000, 20), (48, 4096), (5, 12)])
def test_wide_svd_is_the_thin_svd(a, b):
    """wide_svd (Cholesky QR twice where one side is short, LAPACK otherwise) is the thin SVD: the same singular values
    and the same matrix, orthonormal factors to rounding."""
    g = torch.Generator().manual_seed(a + b)
    X = torch.randn(a, b, generator=g, dtype=torch.float64) * torch.logspace(0, -3, a if a <= b else b, dtype=torch.float64).reshape(
        (-1, 1) if a <= b else (1, -1))
    x, S, yh = wide_svd(X)
    torch.testing.assert_close(S, torch.linalg.svdvals(X), rtol=1e-12, atol=1e-14 * float(S[0]))
    torch.testing.assert_close((x * S) @ yh, X, rtol=0, atol=1e-13 * float(S[0]))
    k = S.numel()
    torch.testing.assert_close(x.mT @ x, torch.eye(k, dtype=X.dtype), rtol=0, atol=1e-13)
    torch.testing.assert_close(yh @ yh.mT, torch.eye(k, dtype=X.dtype), rtol=0, atol=1e-13)


def test_wide_svd_of_a_rank_deficient_matrix_falls_back_to_lapack(monkeypatch):
    """A short side with dependent rows (a Gram Cholesky cannot trust): LAPACK's SVD, its zero singular values kept."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 20000, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:1] * 2])  # 4 rows of rank 3
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda M, **kw: calls.append(tuple(M.shape)) or real(M, **kw))
    x, S, yh = wide_svd(X)
    assert calls == [(4, 20000)] and S[-1] < 1e-12 * S[0]
    torch.testing.assert_close((x * S) @ yh, X, rtol=0, atol=1e-12)
