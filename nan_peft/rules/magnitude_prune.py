"""Magnitude pruning: keep each update's top-`density` magnitudes (no rescale), then the weighted sum."""

import torch

from .family import merge_family


def magnitude_prune(deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, density: float, scale: float = 1.0) -> torch.Tensor:
    return merge_family(deltas, weights, sparsify="magnitude", density=density, scale=scale)
