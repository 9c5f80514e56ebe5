"""Coefficient providers: how much of each adapter's update goes into the merge.

A provider is a function (gram, **options) -> Coefficients registered in PROVIDERS; `coefficients_for`
dispatches by name and rejects options the provider does not take, so conflicting requests fail loudly.
A new provider is one function here plus its line in PROVIDERS.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .errors import NanPeftError
from .norms import UpdateGram
from .registry import checked_options

GRANULARITIES = ("adapter", "module")


@dataclass(frozen=True)
class Coefficients:
    """values[m, k]: the coefficient c of adapter k at module m (0 where the adapter is absent).

    per_adapter holds the single coefficient of each adapter when there is one (granularity "adapter" or
    manual weights); None when coefficients differ by module.
    """

    method: str
    granularity: str
    adapter_names: tuple[str, ...]
    modules: tuple[str, ...]
    values: torch.Tensor
    per_adapter: torch.Tensor | None


def nan_coefficients(gram: UpdateGram, granularity: str = "adapter", exponent: float = 1.0, total: float = 1.0) -> Coefficients:
    """NAN (arXiv 2505.16148): c_k = total * ||dW_k||_F^-p / sum_j ||dW_j||_F^-p.

    Granularity "adapter" (the paper's default) takes the norm of each adapter's whole update, over all its
    modules; "module" takes each module's norm and normalises over the adapters present at that module.
    Exponent p = 1 is the paper's; p = 2 weighs by literal inverse variance; p = 0 is uniform.
    NAN weighs adapters by the size of their updates, which reflects data volume only when the updates are
    zero-mean noise (docs/results.md measures where that holds and where it does not).
    """
    _check_number("exponent", exponent)
    if granularity == "adapter":
        zero = [name for name, norm in zip(gram.adapter_names, gram.adapter_norms.tolist()) if norm == 0]
        if zero:
            raise NanPeftError(f"adapter {zero[0]} has an all-zero update: its inverse norm (NAN coefficient) is undefined")
    return _inverse_norm("nan", gram, granularity, exponent, total)


def uniform_coefficients(gram: UpdateGram, granularity: str = "adapter", total: float = 1.0) -> Coefficients:
    """c_k = total / K (with granularity "module": total / number of adapters present at the module)."""
    return _inverse_norm("uniform", gram, granularity, 0.0, total)


def manual_coefficients(gram: UpdateGram, weights: Sequence[float]) -> Coefficients:
    """User weights, used as given (negative weights subtract an update: task negation)."""
    weights = [float(w) for w in weights]
    if len(weights) != len(gram.adapter_names):
        raise NanPeftError(f"got {len(weights)} weights for {len(gram.adapter_names)} adapters")
    for w in weights:
        _check_number("weight", w)
    if not any(weights):
        raise NanPeftError("all weights are zero: the merged update would be empty")
    per_adapter = torch.tensor(weights, dtype=torch.float64)
    values = per_adapter * gram.present
    return Coefficients("manual", "adapter", gram.adapter_names, gram.modules, values, per_adapter)


PROVIDERS: dict[str, Callable[..., Coefficients]] = {
    "nan": nan_coefficients,
    "uniform": uniform_coefficients,
    "manual": manual_coefficients,
}


def contributions(adapters: Sequence, coefficients: Coefficients) -> Iterator[tuple[str, list, torch.Tensor]]:
    """For each module path where some coefficient is non-zero: the modules of the adapters that contribute there
    and their coefficients, in adapter order."""
    for index, path in enumerate(coefficients.modules):
        c = coefficients.values[index]
        members = [k for k, adapter in enumerate(adapters) if path in adapter.modules and c[k] != 0]
        if members:
            yield path, [adapters[k].modules[path] for k in members], c[members]


def coefficients_for(method: str, gram: UpdateGram, **options) -> Coefficients:
    """Run the provider named `method` with the options that are not None; refuse options it does not take."""
    given = checked_options("coefficients", PROVIDERS, method, 1, options)
    return PROVIDERS[method](gram, **given)


def _inverse_norm(method: str, gram: UpdateGram, granularity: str, exponent: float, total: float) -> Coefficients:
    if granularity not in GRANULARITIES:
        raise NanPeftError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    _check_number("total", total)
    if total <= 0:
        raise NanPeftError(f"total must be positive, got {total}")
    if granularity == "adapter":
        per_adapter = _normalised(gram.adapter_norms, torch.ones(len(gram.adapter_names), dtype=torch.bool), exponent, total)
        return Coefficients(method, granularity, gram.adapter_names, gram.modules, per_adapter * gram.present, per_adapter)
    # Where p > 0, a module whose update is exactly zero would take an infinite weight for nothing (it adds
    # nothing whatever its weight): it counts as absent. Uniform (p = 0) counts every adapter present.
    norms = gram.module_norms
    values = _normalised(norms, gram.present & (norms > 0) if exponent > 0 else gram.present, exponent, total)
    return Coefficients(method, granularity, gram.adapter_names, gram.modules, values, None)


def _normalised(norms: torch.Tensor, mask: torch.Tensor, exponent: float, total: float) -> torch.Tensor:
    """total * n^-p / sum(n^-p) over the entries in mask, along the last axis; 0 outside the mask.

    Computed as a masked softmax of -p log n: n^-p itself overflows or underflows float64 for large |p| (a
    module alone at its path would get 0 / 0)."""
    logits = torch.zeros_like(norms) if exponent == 0 else -exponent * norms.log()  # n = 0, p < 0: weight 0
    logits = logits.masked_fill(~mask, -math.inf)
    top = logits.amax(-1, keepdim=True)
    weights = torch.where(mask & (top > -math.inf), (logits - top.where(top > -math.inf, 0.0)).exp(), 0.0)
    sums = weights.sum(-1, keepdim=True)
    return torch.where(sums > 0, total * weights / sums.where(sums > 0, 1.0), 0.0)


def _check_number(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise NanPeftError(f"{name} must be a finite number, got {value!r}")
