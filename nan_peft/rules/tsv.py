"""TSV-M, Task Singular Vectors Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference
in Model Merging"): each task's singular components, their stacked left and right singular vectors replaced by
their orthogonal polar factors, the singular values kept.

Follows fusion_bench/method/task_singular_vector/utils/TSVM_utils.py (compute_and_sum_svd_mem_reduction), as
AntoAndGar/task_singular_vectors: merged = polar([U_1 | ... | U_K]) diag(S_1, ..., S_K) polar([V_1 | ... | V_K])^T.
Reading for LoRA: each task keeps exactly its own r_k components, the non-zero singular triplets of c_k dW_k
(the paper's fraction 1/K of min(m, n) would add null directions, arbitrary vectors that still bend the polar
factors); no normalisation beyond the coefficients: `scale` is the paper's alpha.
"""

import torch

from .spectral import polar, thin_svd, weighted
from .svc import finish


def tsv(updates: torch.Tensor, weights: torch.Tensor, generator=None, *, scale: float = 1.0, calibrate: str | None = None) -> torch.Tensor:
    parts = [thin_svd(task) for task in weighted(updates, weights)]
    S = torch.cat([s for _, s, _ in parts])
    if S.numel() == 0:
        return updates.new_zeros(updates.shape[1:])
    P_U = polar(torch.cat([x for x, _, _ in parts], dim=1))
    P_V = polar(torch.cat([yh for _, _, yh in parts], dim=0).mT)
    return finish((P_U * S) @ P_V.mT, updates, scale, calibrate)
