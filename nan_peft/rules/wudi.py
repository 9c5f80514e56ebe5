"""WUDI-Merging (Cheng et al. 2025, "Whoever Started the Interference Should End It: Guiding Data-Free Model
Merging via Task Vectors"): the merged update T minimising
    sum_k ||(T - T_k) T_k^T||_F^2 / ||T_k||_F^2,        T_k = c_k dW_k,
solved in closed form. The objective is a least-squares problem whose normal equations are T H = C with
H = sum_k T_k^T T_k / ||T_k||^2 and C = sum_k T_k T_k^T T_k / ||T_k||^2; the minimum-norm minimiser is
T = C H^+ (H's pseudo-inverse over its non-zero eigenvalues): C's rows lie in H's range, so it solves the normal
equations exactly, and it has no component in H's null space, which the objective does not see.

How it differs from the paper's solver (fusion_bench/method/wudi/wudi.py, as nathanielyvo/WUDI-Merging): they
run Adam (lr 1e-5, 300 steps) from T = sum_k T_k on the dense m x n matrix and stop early, so their T is short
of the minimum and, Adam's steps being entry-wise, leaves the span of the updates (it is no longer low rank). The
closed form reaches the minimum within the updates' span, so it is exact at rank R in the core space; Adam on
the core would be a different algorithm (Adam is not rotation-invariant). tests/test_spectral_rules.py
measures both objectives.
"""

import torch

from .spectral import weighted
from .svc import finish

EIGEN_TOL = 1e-12  # H's eigenvalues are squared singular values: zero at or below 1e-12 of the largest (1e-6 in sigma)


def wudi(updates: torch.Tensor, weights: torch.Tensor, generator=None, *, scale: float = 1.0, calibrate: str | None = None) -> torch.Tensor:
    tasks = weighted(updates, weights)
    energy = tasks.square().sum((-2, -1))
    present = energy > 0
    tasks, inverse = tasks[present], 1 / energy[present]
    if tasks.shape[0] == 0:
        return updates.new_zeros(updates.shape[1:])
    grams = tasks.mT @ tasks  # T_k^T T_k, (K, b, b)
    H = (inverse.reshape(-1, 1, 1) * grams).sum(0)
    C = (inverse.reshape(-1, 1, 1) * (tasks @ grams)).sum(0)
    values, vectors = torch.linalg.eigh(H)
    keep = values > max(EIGEN_TOL, 100 * torch.finfo(values.dtype).eps) * values[-1]
    basis = vectors[:, keep]
    merged = ((C @ basis) / values[keep]) @ basis.mT
    return finish(merged, updates, scale, calibrate)
