"""The whole pipeline as one call: read -> norms -> coefficients -> combine, and the result object."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .coefficients import Coefficients, coefficients_for
from .combine import ModuleReport, default_combine
from .combine import combine as combine_updates
from .errors import NanPeftError
from .lora import LoraAdapter
from .norms import UpdateGram, update_gram
from .reader import read_adapters
from .rules import rule_options
from .writer import write_adapter

AdapterLike = str | os.PathLike | LoraAdapter


@dataclass
class MergeResult:
    """A merged adapter with how it was made: norms, coefficients and a per-module report."""

    adapter: LoraAdapter
    coefficients: Coefficients
    gram: UpdateGram
    report: list[ModuleReport]
    sources: list[LoraAdapter]
    options: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(self.adapter.ranks)

    @property
    def norms(self) -> dict[str, float]:
        """||dW_k||_F of each source adapter's whole update."""
        return dict(zip(self.gram.adapter_names, self.gram.adapter_norms.tolist()))

    def save_pretrained(
        self, path: str | os.PathLike, overwrite: bool = False, extra_files: Mapping[str, str | bytes] | None = None
    ) -> Path:
        """Write the merged adapter (peft format, servable form) to `path`, atomically; never over an input."""
        protected = [source.source for source in self.sources if source.source]
        return write_adapter(self.adapter, path, overwrite=overwrite, extra_files=extra_files, protected=protected)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """"auto" (or None) picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise NanPeftError(f"unknown device {device!r} ({error})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise NanPeftError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def merge_adapters(
    adapters: Sequence[AdapterLike],
    combine: str | None = None,
    rank: int | None = None,
    coefficients: str | Sequence[float] = "nan",
    *,
    method: str = "task_arithmetic",
    density: float | None = None,
    scale: float | None = None,
    normalize: bool | None = None,
    seed: int | None = None,
    weights: Sequence[float] | None = None,
    granularity: str | None = None,
    exponent: float | None = None,
    total: float | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    allow_different_bases: bool = False,
    allow_duplicates: bool = False,
) -> MergeResult:
    """Merge LoRA adapters into one; by default dW = sum_k c_k s_k B_k A_k at every module.

    coefficients: "nan" (default; c_k proportional to ||dW_k||_F^-exponent, summing to `total`),
    "uniform", "manual" (with `weights`), or the weights themselves.
    method: the merge rule the coefficients are plugged into (nan_peft.rules.RULES): "task_arithmetic"
    (default, scale * sum_k c_k dW_k), "ties", "dare_linear", "dare_ties", "magnitude_prune", with their
    options density, scale (lambda), normalize and seed. NAN norms are always those of the full updates.
    combine: "cat" (exact, rank = sum of ranks; the default for task_arithmetic) or "svd" (best
    rank-`rank` approximation; the default, and the only choice, for the entry-wise rules).
    Computation runs on `device`; the result is written in `dtype` (default: the inputs' dtype when they
    share one, else float32).
    """
    if not isinstance(coefficients, str):
        if weights is not None:
            raise NanPeftError("give the weights either as coefficients= or as weights=, not both")
        coefficients, weights = "manual", list(coefficients)
    rule = {"density": density, "scale": scale, "normalize": normalize, "seed": seed}
    rule_options(method, rule)  # fail before any reading
    device = resolve_device(device)
    sources = read_adapters(adapters, allow_different_bases=allow_different_bases, allow_duplicates=allow_duplicates)
    gram = update_gram(sources, device)
    coeffs = coefficients_for(coefficients, gram, weights=weights, granularity=granularity, exponent=exponent, total=total)
    dtype = dtype or _common_dtype(sources)
    combine = combine or default_combine(method)
    modules, report = combine_updates(sources, coeffs, gram, combine, rank, device, dtype, method, rule)
    if not modules:
        raise NanPeftError("every coefficient is zero: the merged update is empty")
    extras = {key: tensor for source in sources for key, tensor in source.extras.items()}  # equal across sources
    merged = LoraAdapter(name="merged", source="", config=_merged_config(sources), modules=modules, extras=extras)
    options = {
        "method": method,
        **{key: value for key, value in rule.items() if value is not None},
        "combine": combine,
        "rank": rank,
        "coefficients": coefficients,
        "weights": None if weights is None else [float(w) for w in weights],
        "granularity": coeffs.granularity,
        "exponent": exponent,
        "total": total,
        "dtype": str(dtype).removeprefix("torch."),
    }
    return MergeResult(merged, coeffs, gram, report, sources, options)



def _common_dtype(adapters: Sequence[LoraAdapter]) -> torch.dtype:
    dtypes = {t.dtype for a in adapters for m in a.modules.values() for t in (m.A, m.B)}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _merged_config(sources: Sequence[LoraAdapter]) -> dict:
    """The fields of the sources' configs that the merged adapter keeps (when they agree)."""
    config = {}
    for key in ("base_model_name_or_path", "task_type", "revision"):
        values = {a.config.get(key) for a in sources} - {None}
        config[key] = values.pop() if len(values) == 1 else None
    return config
