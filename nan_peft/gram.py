"""Linear algebra on LoRA factors that never forms a dense (out x in) update.

Every function is pure, batched over leading dimensions and device-agnostic. Callers pass float64 when
they want float64 accumulation. Factors are stacked along the rank axis: for updates dW_k = B_k A_k,
A = [A_1; ...; A_K] is (..., R, n) and B = [B_1 | ... | B_K] is (..., m, R), R = r_1 + ... + r_K, so that
sum_k B_k A_k = B @ A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rank_indicator(ranks: Sequence[int], dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """(R, K) matrix E with E[i, k] = 1 when row i of the stacked A belongs to update k."""
    owner = torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(list(ranks), device=device))
    return torch.nn.functional.one_hot(owner, len(ranks)).to(dtype)


def gram_inner_products(A: torch.Tensor, B: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Frobenius inner products of the stacked updates, shape (..., K, K).

    <B_i A_i, B_j A_j>_F = trace(A_i^T B_i^T B_j A_j) = sum((B_i^T B_j) * (A_i A_j^T)), so all K^2 products come
    from the two R x R Gram matrices A A^T and B^T B at a cost of O(R^2 (m + n)). The diagonal holds the
    squared norms ||B_k A_k||_F^2.
    """
    products = (A @ A.mT) * (B.mT @ B)
    E = rank_indicator(ranks, products.dtype, products.device)
    return E.mT @ products @ E


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product B @ A without forming it: returns (L, S, Rt) with B @ A = L diag(S) Rt.

    With B = Qb Rb and A^T = Qa Ra (reduced QR), B A = Qb (Rb Ra^T) Qa^T; the SVD of the small core
    Rb Ra^T = U S V^T gives L = Qb U and Rt = V^T Qa^T. Cost O((m + n) R^2). Signs are made canonical (the
    largest entry of each column of L is positive) so that results do not depend on the LAPACK build.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    L, Rt = Qb @ U, Vh @ Qa.mT
    pivot = L.abs().argmax(dim=-2, keepdim=True)
    sign = torch.where(torch.gather(L, -2, pivot) < 0, -1.0, 1.0).to(L.dtype)
    return L * sign, S, Rt * sign.mT


def truncate_low_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of B @ A (Eckart-Young), as factors (B_r, A_r) padded with zeros to `rank`.

    B_r = L_r diag(sqrt(S_r)) and A_r = diag(sqrt(S_r)) Rt_r split the singular values evenly between the factors.
    Also returns all singular values S: ||B A - B_r A_r||_F = sqrt(sum_{i >= rank} S_i^2).
    """
    L, S, Rt = low_rank_svd(B, A)
    kept = min(rank, S.shape[-1])
    root = S[..., :kept].sqrt()
    B_r = L[..., :kept] * root.unsqueeze(-2)
    A_r = Rt[..., :kept, :] * root.unsqueeze(-1)
    B_r, A_r = pad_rank(B_r, A_r, rank)
    return B_r, A_r, S


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
