"""Iso-CTS (Marczak et al. 2025): a common subspace (the top singular directions of the summed update) plus each
task's own directions outside it, orthogonalised together, with one isotropic singular value.

Follows fusion_bench/method/isotropic_merging/iso_utils.py (iso_cts), which is danielm1405/iso-merging's. With
d the dimension to fill, the common subspace takes k = int(common * d) directions, rounded so that the rest
divides evenly among the K tasks (d - k = K t); each task contributes the top t left and right singular vectors
of its update with the common left directions projected out, (I - U_c U_c^T) c_k dW_k; the d left and d right
vectors are replaced by their polar factors P_U, P_V; the merge is mean(sigma) P_U P_V^T, the mean over the d
singular values gathered (the common ones and the tasks' residual ones).
Reading for LoRA: d is the rank of the core space, min(rank of the stacked column spaces, rank of the stacked
row spaces) = R (the sum of the ranks) for R <= m, n: the paper's min(m, n) would fill the output with
arbitrary null directions. Every direction must exist: a common subspace larger than the summed update's
rank, or a task with fewer than t directions outside it, is refused (lower or raise `common`).
"""

from __future__ import annotations

import torch

from ..errors import NanPeftError
from .spectral import polar, rank_of, thin_svd, weighted


def common_split(d: int, K: int, common: float) -> tuple[int, int]:
    """(k common directions, t per task) for d directions and K tasks, as iso_utils.iso_cts rounds them."""
    k = int(d * common)
    specific = round((d - k) / K) * K
    if specific > d:
        specific -= K
    return d - specific, specific // K


def iso_cts(updates: torch.Tensor, weights: torch.Tensor, generator=None, *, common: float = 0.8, scale: float = 1.0) -> torch.Tensor:
    if not 0 < common < 1:
        raise NanPeftError(f"common must be in (0, 1), got {common}")
    tasks = weighted(updates, weights)
    K = tasks.shape[0]
    columns = torch.linalg.svdvals(torch.cat(list(tasks), dim=1))
    rows = torch.linalg.svdvals(torch.cat(list(tasks), dim=0))
    d = min(rank_of(columns), rank_of(rows))
    if d == 0:
        return updates.new_zeros(updates.shape[1:])
    k, t = common_split(d, K, common)
    x, S, yh = thin_svd(tasks.sum(0))
    if k > S.numel():
        raise NanPeftError(f"iso_cts: a common subspace of {k} directions (common {common} of rank {d}) but the summed update "
                           f"has rank {S.numel()}; lower common")
    Uc = x[:, :k]
    left, right, sigma = [Uc], [yh[:k]], [S[:k]]
    for i, task in enumerate(tasks):
        xt, St, yht = thin_svd(task - Uc @ (Uc.mT @ task))
        if St.numel() < t:
            raise NanPeftError(f"iso_cts: {t} task-specific directions per task (common {common} of rank {d}) but task {i + 1} has "
                               f"{St.numel()} outside the common subspace; raise common")
        left.append(xt[:, :t])
        right.append(yht[:t])
        sigma.append(St[:t])
    P_U, P_V = polar(torch.cat(left, dim=1)), polar(torch.cat(right, dim=0).mT)
    return scale * torch.cat(sigma).mean() * (P_U @ P_V.mT)
