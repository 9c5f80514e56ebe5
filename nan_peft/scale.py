"""`--scale auto`: a merge rule's global scale from the adapters alone, no data.

Every rule maps the coefficient-weighted updates c_k dW_k of each module to one merged update M_m; how large
M_m comes out depends on the rule (Iso-C flattens the spectrum, TSV-M orthogonalises, WUDI solves a least-squares
problem, TIES takes a disjoint mean), and the papers pick the scale alpha multiplying it on validation data. The
auto rule instead sets the merged update's global Frobenius norm to a fixed multiple GAMMA of a typical
adapter's own update norm:

    reference^2 = sum_m ( sum_k |c_mk| ||dW_mk||_F / sum_k |c_mk| )^2          (the |c|-weighted mean norm
                                                                                  of each module's updates)
    scale       = GAMMA * reference / sqrt( sum_m ||M_m||_F^2 )                 (M_m: the rule at scale 1,
                                                                                  before any calibration)

so the merge is GAMMA times as large as one adapter's update, whatever the rule does to the spectrum and
whatever the coefficients sum to. ||dW_mk|| comes from the r x r Grams (norms.UpdateGram), ||M_m|| from
combination.merged_norms, the rule without its output (exact: the Grams for task arithmetic, the rule's core for
the spectral rules, the dense update for the entry-wise rules; no SVD, no merged factors), so nothing is formed
that the merge does not form already. The merge then runs once at the number chosen, so that its bytes are those
of `--scale <scale_chosen>` (scaling a finished merge would round differently). GAMMA was chosen on the validation
split of the evaluation (docs/results.md, "A scale without data"), never on its test split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .errors import NanPeftError

AUTO = "auto"
GAMMA = 1.4
"""The merged update's norm as a multiple of the |c|-weighted mean adapter norm, chosen on the validation splits of
both of the evaluation's task suites (eval/gamma.py; docs/results.md, "A scale without data"): the spectral rules'
mean normalized validation accuracy, pooled over rules, uniform and NAN, both LoRA settings and three seeds, is
98.8 / 100.0 / 100.4 / 100.0 / 99.6 / 97.0 % on the text tasks and 75.0 / 77.5 / 81.0 / 85.7 / 89.7 / 90.7 % on the
probing2 tasks at gamma = 0.35 / 0.5 / 0.7 / 1.0 / 1.4 / 2.0; the suites' mean peaks at 1.4 (94.6 %)."""


def parse_scale(value) -> float | str:
    """--scale's value: a number, or "auto" (the CLI gives text, a recipe a number or the word)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            return float(text)
        except ValueError:
            raise NanPeftError(f"scale must be a number or auto, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise NanPeftError(f"scale must be a number or auto, got {value!r}")
    return float(value)


def reference_norm(module_norms: torch.Tensor, coefficients: torch.Tensor) -> float:
    """sqrt(sum_m (sum_k |c_mk| n_mk / sum_k |c_mk|)^2) for per-module update norms n (M, K) and coefficients
    c (M, K) (modules whose coefficients are all 0 add nothing)."""
    n = module_norms.to(torch.float64)
    c = coefficients.to(torch.float64).abs().expand_as(n)
    weight = c.sum(-1)
    mean = torch.where(weight > 0, (c * n).sum(-1) / weight.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return float(mean.square().sum().sqrt())


def auto_scale(merged_norms: Sequence[float], module_norms: torch.Tensor, coefficients: torch.Tensor, gamma: float = GAMMA) -> float:
    """GAMMA * reference_norm / ||M||, ||M|| = sqrt(sum_m merged_norms_m^2): the rule's merged update at scale 1."""
    merged = math.sqrt(sum(float(x) ** 2 for x in merged_norms))
    if not merged > 0:
        raise NanPeftError("scale auto: the rule's merged update is zero, so no scale can set its norm")
    return gamma * reference_norm(module_norms, coefficients) / merged
