"""The generalised task-arithmetic family, written once: sparsify each update, weight, optionally elect
signs and keep only agreeing entries (TIES consensus), sum or average, scale.

All functions act on one module at a time: deltas (K, m, n) holds the K dense updates dW_k = s_k B_k A_k.
"""

from __future__ import annotations

import torch

from ..errors import NanPeftError


def trim_magnitude(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) largest-magnitude entries of each update, zero the rest (TIES "trim").
    Entries whose magnitude ties with the last one kept fill the remaining places in index order, on every device."""
    flat = deltas.reshape(deltas.shape[0], -1)
    numel = flat.shape[1]
    keep = int(density * numel)
    if keep >= numel:
        return deltas
    if keep == 0:
        return torch.zeros_like(deltas)
    magnitude = flat.abs()
    kth = kth_largest(magnitude, keep)
    # the mask as 0/1 in the updates' dtype, not bool: a product with a bool mask costs 4x one of two floats
    mask = torch.ge(magnitude, kth, out=torch.empty_like(flat))
    surplus = mask.sum(1, keepdim=True, dtype=torch.float64) - keep
    if bool((surplus > 0).any()):  # ties at the k-th magnitude: keep the first of them
        ties = magnitude == kth
        mask[ties & (ties.cumsum(1) > ties.sum(1, keepdim=True) - surplus)] = 0
    return mask.mul_(flat).reshape(deltas.shape)


def kth_largest(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, 1): each row's k-th largest entry. On the CPU by numpy's introselect (np.partition), 4-5x faster than
    torch.topk on the 10^5-10^6 entries of a module's update; elsewhere from torch.topk's values."""
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        import numpy as np

        at = magnitude.shape[1] - k
        return torch.from_numpy(np.partition(magnitude.numpy(), at, axis=1)[:, at : at + 1].copy())
    return magnitude.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)


def drop_random(deltas: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool = True) -> torch.Tensor:
    """DARE: keep each entry with probability `density`, dividing the kept ones by `density` so that the
    expectation of the update is unchanged (rescale)."""
    if density >= 1:
        return deltas
    # drawn on the CPU in float64 whatever the device and dtype of the updates: the same seed gives the same
    # mask for the svd merge (float64), the fold (float32) and on a GPU
    draws = torch.rand(deltas.shape, generator=generator, dtype=torch.float64)
    if deltas.device.type == "cpu" and deltas.dtype == torch.float64:  # in the draws' memory: 1.0 or 0.0, times dW
        kept = draws.lt_(density).mul_(deltas)  # (keep * dW) / density is dW / density or 0 (of dW's sign), as below
        return kept.div_(density) if rescale else kept
    keep = draws.lt_(density).to(deltas.device, deltas.dtype)
    return (deltas / density if rescale else deltas.clone()).mul_(keep)


SIGN_METHODS = ("total", "frequency")


def elect_sign(weighted: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES sign election, entry by entry, on the weighted updates c_k dW_k: by mass ("total",
    sign(sum_k c_k dW_k)) or by vote ("frequency", the sign most of the non-zero c_k dW_k have; a tied vote
    goes to the mass, as "total" elects). peft's calculate_majority_sign_mask counts the same votes but gives a
    tied vote to +1 (and elects on the unweighted updates: the same signs for positive coefficients)."""
    mass = weighted.sum(0).sign()
    if method == "total":
        return mass
    if method == "frequency":
        votes = weighted.sign().sum(0).sign()
        return torch.where(votes == 0, mass, votes)
    raise NanPeftError(f"unknown majority_sign_method {method!r}; choose from {', '.join(SIGN_METHODS)}")


def merge_family(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    *,
    sparsify: str | None = None,
    density: float = 1.0,
    consensus: bool = False,
    normalize: bool = True,
    sign_method: str = "total",
    scale: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """scale * merge of the K updates with coefficients c = weights.

    sparsify: None, "magnitude" (trim) or "random" (DARE drop and rescale), at `density`.
    Without consensus: sum_k c_k dW'_k. With consensus (TIES): entries whose weighted sign disagrees with
    the sign elected by `sign_method` (elect_sign: "total" or "frequency"), or that were sparsified away,
    are left out; with `normalize` the rest is averaged with weights |c_k| (sum_k c_k dW'_k [agree] /
    sum_k |c_k| [agree], TIES's disjoint mean with the coefficients plugged in), else summed. Each entry is
    then a convex combination of the agreeing sign(c_k) dW'_k: a negative coefficient keeps its negation (one
    adapter with c = -1 gives -dW') and mixed-sign coefficients never inflate the result (a signed divisor
    c_1 + c_2 could be near 0). For positive coefficients |c_k| = c_k. peft's disjoint_merge divides by the
    number of agreeing adapters instead: the same for coefficients all 1, scaled by them otherwise.
    """
    if not 0 < density <= 1:
        raise NanPeftError(f"density must be in (0, 1], got {density}")
    if sparsify == "magnitude":
        deltas = trim_magnitude(deltas, density)
    elif sparsify == "random":
        deltas = drop_random(deltas, density, generator)
    elif sparsify is not None:
        raise ValueError(f"unknown sparsification {sparsify!r}")
    c = weights.to(deltas.dtype).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas if bool((c == 1).all()) else deltas * c  # x * 1.0 is x (KnOTS merges its blocks with weights 1)
    if not consensus:
        return scale * weighted.sum(0)
    elected = elect_sign(weighted, sign_method)
    # c_k dW'_k agrees where its product with the elected sign is positive (entries sparsified to 0 never do), and
    # there equals elected * |c_k dW'_k|: the agreeing entries sum to elected * sum_k max(c_k dW'_k * elected, 0),
    # the same numbers as summing them where they agree, in fewer passes over the K updates
    aligned = (weighted * elected).clamp_min_(0)
    merged = elected.mul_(aligned.sum(0))
    if normalize:
        if weighted is deltas:  # aligned >= 0: its signs count the agreeing entries (0 where none agrees: 0 / 1)
            merged.div_(aligned.sign_().sum(0).clamp_min_(1))
        else:
            divisor = (c.abs() * (aligned > 0)).sum(0)
            merged.div_(torch.where(divisor == 0, 1.0, divisor))
    return merged if scale == 1 else merged.mul_(scale)
