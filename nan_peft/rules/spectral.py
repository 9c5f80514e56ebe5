"""What the spectral rules share: they act on a stack of K updates (K, a, b), weighted by the coefficients
first, and are equivariant under orthogonal changes of basis (f(P T_k Q^T) = P f(T_k) Q^T; KnOTS on the left
only), so the same function merges dense (m x n) updates and their R x R cores (core_space.py) to the same
update. Dimensions are therefore never read from the arrays' shapes but from numerical ranks: a singular value
at or below RANK_TOL times the largest one is zero (a dense m x n update of rank R has min(m, n) - R of them).

After the rule, svc.finish applies `scale` and, with `calibrate="svc"`, the singular value calibration.
"""

from __future__ import annotations

import torch

from ..gram import wide_svd

RANK_TOL = 1e-9


def rank_of(S: torch.Tensor) -> int:
    """How many of the singular values S (descending) are non-zero: above RANK_TOL times the largest in float64,
    100 ulps of it in a narrower dtype (a float32 SVD's zero singular values are about 1e-7 of the largest)."""
    if S.numel() == 0 or not S[0] > 0:
        return 0
    return int((S > max(RANK_TOL, 100 * torch.finfo(S.dtype).eps) * S[0]).sum())


def thin_svd(T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, S, yh) of T's non-zero singular triplets only: T = x diag(S) yh (gram.wide_svd: Cholesky QR first where T
    is short and wide, as KnOTS's concatenation of left-reduced updates is)."""
    x, S, yh = wide_svd(T)
    k = rank_of(S)
    return x[:, :k], S[:k], yh[:k]


def polar(X: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor of X (a x c): the nearest matrix with orthonormal columns (rows, when c > a),
    x yh from X's thin SVD, as TSV-M and Iso-CTS orthogonalise their stacked singular vectors."""
    x, _, yh = torch.linalg.svd(X, full_matrices=False)
    return x @ yh


def weighted(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """c_k T_k: the coefficients weight each update before the rule."""
    return updates * weights.to(updates.dtype).reshape(-1, 1, 1)
