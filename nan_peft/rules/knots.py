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
Equivariant on the left only: the core path feeds it U^T dW_k (p x n), exact, since U is orthonormal.
"""

import torch

from ..gram import wide_left_svd
from .family import merge_family
from .spectral import rank_of, thin_svd, weighted
from .svc import finish


def _knots(updates, weights, generator, sparsify, density, normalize, majority_sign_method, scale, calibrate):
    K, n = updates.shape[0], updates.shape[-1]
    left = wide_left_svd(updates, weights)
    if left is not None:  # diag(s) V_k^T = x^T c_k T_k: the projections, without forming the concatenation's V
        x = left[0][:, : rank_of(left[1])]
        blocks = (weights.to(updates.dtype).reshape(-1, 1, 1) * x.mT) @ updates
    else:
        x, S, yh = thin_svd(torch.cat(list(weighted(updates, weights)), dim=1))
        blocks = torch.stack((S.unsqueeze(-1) * yh).split(n, dim=1))  # diag(s) V_k^T, (K, k, n)
    if x.shape[-1] == 0:
        return updates.new_zeros(updates.shape[1:])
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
