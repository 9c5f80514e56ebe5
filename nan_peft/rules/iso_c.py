"""Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces"): the SVD of the sum of the weighted updates with every singular value replaced by their mean.

Follows fusion_bench/method/isotropic_merging/iso_utils.py (iso_c) and danielm1405/iso-merging. Reading for
LoRA: the mean is over the non-zero singular values of sum_k c_k dW_k (its rank, at most R = sum of the ranks),
not over all min(m, n) of them, most of which are zero for a low-rank update and would make the result depend on
the module's size. The flat spectrum leaves no singular direction to calibrate: no calibrate option.
"""

import torch

from .spectral import thin_svd, weighted


def iso_c(updates: torch.Tensor, weights: torch.Tensor, generator=None, *, scale: float = 1.0) -> torch.Tensor:
    x, S, yh = thin_svd(weighted(updates, weights).sum(0))
    if S.numel() == 0:
        return updates.new_zeros(updates.shape[1:])
    return scale * S.mean() * (x @ yh)
