"""The Gram-matrix identities against dense float64 computations."""

import pytest
import torch

from nan_peft.gram import gram_inner_products, low_rank_svd, pad_rank, tail_energy, truncate_low_rank


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
