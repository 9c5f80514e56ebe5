"""KnOTS (Stoica et al. 2025, "Model merging with SVD to tie the KnOTS"): align the updates in the SVD of their
concatenation, then merge each task's coordinates in it with TIES (knots_ties) or DARE + TIES (knots_dare).

Follows gstoica27/KnOTS task_merger.py (SVDMerger.apply_svd and merge, with s_on_V=True, concat_across_output)
and masking_ops.py. [T_1 | ... | T_K] = U diag(s) [V_1^T | ... | V_K^T] (T_k = c_k dW_k, m x n; components with a
zero singular value dropped, as their s > 1e-5 does, here relative); each task is represented by its block
diag(s) V_k^T (k x n, k <= R: the right singular blocks, never m x n); TIES trims each block to its top `density`
magnitudes (knots_dare drops entries with probability 1 - density and rescales instead, seeded per module, then
keeps TIES's sign consensus, as their dare=True with topK=100 does), elects each entry's sign and averages the
agreeing entries (normalize, their "mean") or sums them; the merge is U @ merged block.
Readings: the trim is per module, as nan-peft's ties (KnOTS trims over the whole model's flattened blocks); the
coefficients weight the updates before the SVD (KnOTS multiplies the merged block by one scalar after it).
Equivariant on the left only: the core path feeds it U^T dW_k (p x n), exact, since U is orthonormal, as a
`Factored` stack where it has the factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..gram import cholesky_qr_pays, left_svd_of_gram, wide_left_svd
from .family import merge_family
from .spectral import rank_of, thin_svd, weighted
from .svc import finish


@dataclass(frozen=True)
class Factored:
    """K left-reduced updates kept as the factors they come from (core_space's batched path): L_k = left[:, s_k] @
    right[s_k] with left (p, R), right (R, n), `parts` the K slices s_k of the rank axis and gram = right right^T
    (R, R), which core_space has computed already. KnOTS then needs neither the L_k nor their Gram's products: the
    concatenation's Gram is sum_k c_k^2 left_k (right_k right_k^T) left_k^T and its blocks x^T c_k L_k are
    (c_k x^T left_k) right_k, products with r_k rows instead of p."""

    left: torch.Tensor
    right: torch.Tensor
    parts: list
    gram: torch.Tensor

    def dense(self) -> torch.Tensor:
        return torch.stack([self.left[:, s] @ self.right[s] for s in self.parts])

    def concatenation_gram(self, weights: torch.Tensor) -> torch.Tensor:
        w = weights.to(self.left.dtype)
        return sum(w[k].square() * (self.left[:, s] @ self.gram[s, s] @ self.left[:, s].mT) for k, s in enumerate(self.parts))

    def projected(self, lefts: list[torch.Tensor]) -> torch.Tensor:
        """(K, k, n): lefts[k] (k, p) @ L_k for each k, into one stack."""
        out = self.right.new_empty(len(self.parts), lefts[0].shape[0], self.right.shape[1])
        for k, (s, x) in enumerate(zip(self.parts, lefts)):
            torch.matmul(x @ self.left[:, s], self.right[s], out=out[k])
        return out


def _knots(updates, weights, generator, sparsify, density, normalize, majority_sign_method, scale, calibrate):
    if isinstance(updates, Factored) and calibrate is not None:
        updates = updates.dense()  # svc calibrates against the updates themselves
    factored = isinstance(updates, Factored)
    K = len(weights)
    p, n = (updates.left.shape[0], updates.right.shape[1]) if factored else updates.shape[1:]
    left = None
    if cholesky_qr_pays(p, K * n):
        left = left_svd_of_gram(updates.concatenation_gram(weights)) if factored else wide_left_svd(updates, weights)
    if left is not None:  # diag(s) V_k^T = x^T c_k T_k: the projections, without forming the concatenation's V
        x = left[0][:, : rank_of(left[1])]
        w = weights.to(x.dtype)
        blocks = updates.projected([w[k] * x.mT for k in range(K)]) if factored else (w.reshape(-1, 1, 1) * x.mT) @ updates
    else:
        dense = updates.dense() if factored else updates
        x, S, yh = thin_svd(torch.cat(list(weighted(dense, weights)), dim=1))
        blocks = torch.stack((S.unsqueeze(-1) * yh).split(n, dim=1))  # diag(s) V_k^T, (K, k, n)
    if x.shape[-1] == 0:
        return x.new_zeros(p, n)
    merged = merge_family(blocks, torch.ones(K, dtype=blocks.dtype, device=blocks.device), sparsify=sparsify, density=density,
                          consensus=True, normalize=normalize, sign_method=majority_sign_method, generator=generator)
    return finish(x @ merged, updates, scale, calibrate)


def knots_ties(
    updates: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0, normalize: bool = True,
    majority_sign_method: str = "total", calibrate: str | None = None,
) -> torch.Tensor:
    return _knots(updates, weights, generator, "magnitude", density, normalize, majority_sign_method, scale, calibrate)


def knots_dare(
    updates: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0, normalize: bool = True,
    majority_sign_method: str = "total", calibrate: str | None = None,
) -> torch.Tensor:
    return _knots(updates, weights, generator, "random", density, normalize, majority_sign_method, scale, calibrate)
