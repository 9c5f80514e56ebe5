"""Task arithmetic (Ilharco et al. 2023): dW = scale * sum_k c_k dW_k.

Low rank: the pipeline computes it exactly from the factors (cat / QR-SVD), never densely; this dense
form serves as the family's reference and for paths that need dense updates. With calibrate="svc" (svc.py)
the sum is calibrated after scaling, in the core space (combine's spectral path).
"""

import torch

from .family import merge_family
from .svc import finish


def task_arithmetic(deltas: torch.Tensor, weights: torch.Tensor, generator=None, *, scale: float = 1.0, calibrate: str | None = None) -> torch.Tensor:
    if calibrate is None:
        return merge_family(deltas, weights, scale=scale)
    return finish(merge_family(deltas, weights), deltas, scale, calibrate)
