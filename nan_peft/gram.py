"""Linear algebra on LoRA factors that never forms a dense (out x in) update (but for truncate_dense).

Every function is pure, batched over leading dimensions and device-agnostic. Callers pass float64 when
they want float64 accumulation. Factors are stacked along the rank axis: for updates dW_k = B_k A_k,
A = [A_1; ...; A_K] is (..., R, n) and B = [B_1 | ... | B_K] is (..., m, R), R = r_1 + ... + r_K, so that
sum_k B_k A_k = B @ A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rank_owner(ranks: Sequence[int], device=None) -> torch.Tensor:
    """(R,) index of the update each row of the stacked A belongs to: [0]*r_1 + [1]*r_2 + ..."""
    return torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(list(ranks), device=device))


def gram_inner_products(A: torch.Tensor, B: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Frobenius inner products of the stacked updates, shape (..., K, K).

    <B_i A_i, B_j A_j>_F = trace(A_i^T B_i^T B_j A_j) = sum((B_i^T B_j) * (A_i A_j^T)), so all K^2 products come
    from the two R x R Gram matrices A A^T and B^T B at a cost of O(R^2 (m + n)). The diagonal holds the
    squared norms ||B_k A_k||_F^2. The blocks are summed by index, never multiplied by 0, so one Inf stays
    in its own entries.
    """
    products = (A @ A.mT) * (B.mT @ B)
    owner = rank_owner(ranks, products.device)
    shape = products.shape[:-2]
    rows = products.new_zeros((*shape, len(ranks), products.shape[-1])).index_add_(-2, owner, products)
    return rows.new_zeros((*shape, len(ranks), len(ranks))).index_add_(-1, owner, rows)


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product B @ A without forming it: returns (L, S, Rt) with B @ A = L diag(S) Rt.

    With B = Qb Rb and A^T = Qa Ra (reduced QR), B A = Qb (Rb Ra^T) Qa^T; the SVD of the small core
    Rb Ra^T = U S V^T gives L = Qb U and Rt = V^T Qa^T. Cost O((m + n) R^2).
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    L, Rt = canonical_signs(Qb @ U, Vh @ Qa.mT)
    return L, S, Rt


def canonical_signs(L: torch.Tensor, Rt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so that the largest entry of each column of L is positive: results then
    do not depend on the LAPACK build or device. Returns (L, Rt) with L diag(S) Rt unchanged."""
    pivot = L.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(L, -2, pivot) < 0, -1.0, 1.0).to(L.dtype)
    return L * sign, Rt * sign.mT


def split_singular(L: torch.Tensor, S: torch.Tensor, Rt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_r, A_r) of the rank-`rank` truncation L_r diag(S_r) Rt_r, zero-padded to `rank`; the
    singular values are split evenly: B_r = L_r diag(sqrt(S_r)), A_r = diag(sqrt(S_r)) Rt_r."""
    kept = min(rank, S.shape[-1])
    root = S[..., :kept].sqrt()
    return pad_rank(L[..., :kept] * root.unsqueeze(-2), Rt[..., :kept, :] * root.unsqueeze(-1), rank)


def truncate_low_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of B @ A (Eckart-Young) as factors (B_r, A_r), never forming B @ A.

    Also returns all singular values S of B @ A: ||B A - B_r A_r||_F = tail_energy(S, rank).
    """
    L, S, Rt = low_rank_svd(B, A)
    return *split_singular(L, S, Rt, rank), S


def truncate_dense(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """truncate_low_rank for an update that exists only densely (after a sparsifying merge rule)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    return *split_singular(U, S, Vh, rank), S


def pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, A) along the rank axis to `rank`; the product B @ A is unchanged."""
    extra = rank - A.shape[-2]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[-2]} down to {rank}")
    if extra == 0:
        return B, A
    return torch.nn.functional.pad(B, (0, extra)), torch.nn.functional.pad(A, (0, 0, 0, extra))


def tail_energy(S: torch.Tensor, rank: int) -> torch.Tensor:
    """sqrt(sum_{i >= rank} S_i^2): the Frobenius norm discarded by truncating to `rank`."""
    return S[..., rank:].square().sum(-1).sqrt()
