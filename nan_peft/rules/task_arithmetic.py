"""Task arithmetic (Ilharco et al. 2023): dW = scale * sum_k c_k dW_k.

Low rank: the pipeline computes it exactly from the factors (cat / QR-SVD), never densely; this dense
form serves as the family's reference and for paths that need dense updates.
"""

import torch

from .family import merge_family


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, scale: float = 1.0) -> torch.Tensor:
    return merge_family(deltas, weights, scale=scale)
