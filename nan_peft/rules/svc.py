"""Singular value calibration, SVC (Li et al. 2026, "When Shared Knowledge Hurts: Spectral Over-Accumulation in
Model Merging", arXiv 2602.05536), after a merge rule: each singular direction of the merged update is scaled
down by how much more of it the merge carries than the tasks do.

Follows the authors' code, lyymuwu/SVC merge_func.py (coef_cal_multi_ranks with its defaults: left singular
vectors, all tasks, alpha = 1). With the merged update T = sum_r sigma_r x_r y_r^T (thin SVD) and the adapters'
own updates D_k = s_k B_k A_k (not weighted by the coefficients: the task's response is what the merge should
not exceed), each direction r has responses a_r = x_r^T T = sigma_r y_r^T and a_rk = x_r^T D_k, the projection
coefficients s_rk = <a_r, a_rk> / ||a_rk||^2, and
    eta_r = max(mean_k s_rk, 1) where every s_rk > 0, else 1;      sigma_r <- sigma_r / eta_r.
A direction some task does not carry (a_rk = 0: below 1e-9 of ||D_k||) or opposes is left as it is, as the
authors' code leaves it (their s would be 0 there). The paper's Eq. (10), gamma_r = K / sum_k max(alpha, s_rk),
differs where the s_rk straddle 1; FusionBench's port (fusion_bench/method/singular_value_calibration/utils.py)
projects each task on its own singular vectors instead of the merged ones: neither is followed here.
Orthogonally equivariant: the same on dense updates and on their cores.
"""

from __future__ import annotations

import torch

from ..errors import NanPeftError
from .spectral import thin_svd

CALIBRATIONS = ("svc",)
RESPONSE_TOL = 1e-9


def singular_value_calibration(merged: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    """`merged` (a, b) with its singular values calibrated against the K updates (K, a, b)."""
    x, S, yh = thin_svd(merged)
    if S.numel() == 0:
        return merged
    responses = torch.einsum("ar,kab->krb", x, updates)  # a_rk, (K, r, b)
    energy = responses.square().sum(-1)  # ||a_rk||^2
    carried = energy.sqrt() > max(RESPONSE_TOL, 100 * torch.finfo(energy.dtype).eps) * torch.linalg.matrix_norm(updates).unsqueeze(-1)
    overlap = torch.einsum("rb,krb->kr", S.unsqueeze(-1) * yh, responses)  # <a_r, a_rk>
    s = torch.where(carried, overlap / torch.where(carried, energy, 1.0), 0.0)
    eta = torch.where((s > 0).all(0), s.mean(0).clamp_min(1.0), 1.0)
    return (x * (S / eta)) @ yh


def finish(merged: torch.Tensor, updates: torch.Tensor, scale: float, calibrate: str | None) -> torch.Tensor:
    """What follows every rule that can be calibrated: `scale` times its merged update, then, with calibrate="svc",
    calibrated against the unweighted updates (the authors calibrate the merged task vector as it is added, its
    scaling coefficient included)."""
    if scale != 1:  # x * 1.0 is x: no pass over the merged update for the default scale
        merged = scale * merged
    if calibrate is None:
        return merged
    if calibrate not in CALIBRATIONS:
        raise NanPeftError(f"unknown calibrate {calibrate!r}; choose from {', '.join(CALIBRATIONS)}")
    return singular_value_calibration(merged, updates)
