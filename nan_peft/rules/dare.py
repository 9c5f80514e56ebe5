"""DARE (Yu et al. 2024): drop each entry of each update with probability 1 - density and rescale the
rest by 1 / density, then sum (dare_linear) or resolve signs as TIES does (dare_ties, by mass or by vote:
majority_sign_method). Seeded per module."""

import torch

from .family import merge_family


def dare_linear(deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0) -> torch.Tensor:
    return merge_family(deltas, weights, sparsify="random", density=density, scale=scale, generator=generator)


def dare_ties(
    deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0, normalize: bool = True,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    return merge_family(
        deltas, weights, sparsify="random", density=density, consensus=True, normalize=normalize,
        sign_method=majority_sign_method, scale=scale, generator=generator,
    )
