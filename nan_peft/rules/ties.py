"""TIES-Merging (Yadav et al. 2023): trim each update to its top-`density` magnitudes, elect the sign of
each entry by mass (majority_sign_method "total") or by vote ("frequency"), take the |c_k|-weighted mean of the
entries that agree (sum c_k dW_k / sum |c_k|: a negative coefficient negates), scale by lambda."""

import torch

from .family import merge_family


def ties(
    deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0, normalize: bool = True,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    return merge_family(
        deltas, weights, sparsify="magnitude", density=density, consensus=True, normalize=normalize,
        sign_method=majority_sign_method, scale=scale,
    )
