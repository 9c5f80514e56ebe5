"""The whole pipeline as one call: read -> norms -> coefficients -> combine, and the result object."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .coefficients import Coefficients, coefficients_for
from .combination import ModuleReport, check_combine, merged_norms
from .combination import combine as combine_updates
from .errors import NanPeftError
from .fold import fold_into
from .lora import LoraAdapter
from .norms import InnerProducts, UpdateGram, update_gram, update_norms
from .rules import LOW_RANK
from .reader import read_adapters
from .scale import AUTO, auto_scale
from .spec import HEADS as spec_heads
from .spec import MergeSpec
from .serving import ServingPlan, Target, plan_for
from .writer import write_adapter

AdapterLike = str | os.PathLike | LoraAdapter
HEADS = tuple(mode.replace("-", "_") for mode in spec_heads)  # the CLI's per-task is per_task in Python; both are taken


@dataclass
class MergeResult:
    """A merged adapter with how it was made: norms, coefficients and a per-module report."""

    adapter: LoraAdapter
    coefficients: Coefficients
    gram: UpdateGram
    report: list[ModuleReport]
    sources: list[LoraAdapter]
    options: dict = field(default_factory=dict)
    """The options as the record holds them (MergeSpec.record_options)."""
    spec: MergeSpec | None = None
    """The spec the merge was made with (None for a result assembled by hand)."""

    @property
    def rank(self) -> int:
        return max(self.adapter.ranks)

    @property
    def norms(self) -> dict[str, float]:
        """||dW_k||_F of each source adapter's whole update."""
        return dict(zip(self.gram.adapter_names, self.gram.adapter_norms.tolist()))

    @property
    def shared_saved(self) -> dict[str, torch.Tensor]:
        """Saved full modules (peft's modules_to_save) that every source carries, identical."""
        first, *others = self.sources
        return {
            key: tensor
            for key, tensor in first.saved.items()
            if all(key in o.saved and o.saved[key].shape == tensor.shape and torch.equal(o.saved[key], tensor) for o in others)
        }

    @property
    def heads(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each source's own saved full modules (task heads): those not shared identically by all sources.
        They cannot be averaged; save_pretrained(heads="per_task") writes each with its own copy of the merge."""
        shared = self.shared_saved
        heads = {a.name: {k: t for k, t in a.saved.items() if k not in shared} for a in self.sources}
        return {name: tensors for name, tensors in heads.items() if tensors}

    def task_adapters(self) -> dict[str, LoraAdapter]:
        """One complete adapter per source that carries saved modules: the merged LoRA update plus the shared
        saved modules plus the source's own (its head), with the source's task_type."""
        shared = self.shared_saved
        return {
            source.name: replace(
                self.adapter,
                name=source.name,
                config={**self.adapter.config, "task_type": source.config.get("task_type")},
                saved={**shared, **self.heads.get(source.name, {})},
            )
            for source in self.sources
            if source.saved
        }

    def notices(self, heads: str = "drop") -> list[str]:
        """What saving with `heads` leaves out, in words (empty when nothing is)."""
        heads = heads.replace("-", "_")
        carried = sorted({m for a in self.sources for m in a.saved_modules})
        if not carried or heads == "per_task" or (heads == "keep" and not self.heads):
            return []
        return [
            f"the sources carry full modules ({', '.join(carried)}: modules_to_save) that are left out of the merged "
            "adapter; heads='per_task' (--heads per-task) writes one complete adapter per task beside it"
        ]

    def adapter_for(self, heads: str = "drop") -> LoraAdapter:
        """The adapter save_pretrained writes at the top of its folder for `heads` (see there): the merged LoRA,
        with the saved modules all sources share when heads is "keep"."""
        heads = heads.replace("-", "_")
        if heads not in HEADS:
            raise NanPeftError(f"unknown heads {heads!r}; choose from {', '.join(HEADS)}")
        if heads != "keep":
            return self.adapter
        if self.heads:
            raise NanPeftError(f"{', '.join(self.heads)} carry their own full modules (heads); save them with heads='per_task' (--heads per-task)")
        return replace(self.adapter, saved=self.shared_saved)

    def save_pretrained(
        self,
        path: str | os.PathLike,
        overwrite: bool = False,
        extra_files: Mapping[str, str | bytes] | None = None,
        heads: str = "drop",
        serve: str | Target | ServingPlan | None = None,
    ) -> Path:
        """Write the merged adapter (peft format, servable form) to `path`, atomically; never over an input.

        heads, for sources that carry full modules (peft's modules_to_save, e.g. classification heads):
        "drop" writes the merged LoRA alone, what serving engines load (a warning names what is left out);
        "per_task" also writes path/<source name>/ for each such source: the merged LoRA with the shared
        saved modules and that source's own head, loadable with PeftModel.from_pretrained(model, path,
        subfolder=name) into a model with that task's label count (each holds a copy of the merged factors);
        "keep" writes the saved modules into the merged adapter itself, when all sources share them identically.
        serve (an engine of serving.ENGINES, a serving.Target with its tensor-parallel degree and version, or a
        plan already made by serving.plan_for) fits the adapter to that engine (the rank padded with zeros to
        one the engine serves as peft does, tensors it refuses left out) and refuses, writing nothing, when
        the engine still could not serve it.
        """
        heads = heads.replace("-", "_")
        adapter = self.adapter_for(heads)
        subfolders = self.task_adapters() if heads == "per_task" else {}
        rank = None
        if serve is not None:
            plan = serve if isinstance(serve, ServingPlan) else plan_for(adapter, serve, where=str(path))
            plan.raise_for_errors()
            adapter, rank = plan.adapter, plan.rank
        for notice in self.notices(heads):
            warnings.warn(notice, stacklevel=2)
        protected = [source.source for source in self.sources if source.source]
        return write_adapter(
            adapter, path, rank=rank, overwrite=overwrite, extra_files=extra_files, protected=protected, subfolders=subfolders
        )

    def fold_into(self, base: str | os.PathLike, output: str | os.PathLike, **options) -> Path:
        """Write base + the exact merged update (never truncated) as a full model: see nan_peft.fold.fold_into."""
        return fold_into(self, base, output, **options)


def merge_adapters(
    adapters: Sequence[AdapterLike],
    combine: str | None = None,
    rank: int | None = None,
    coefficients: str | Sequence[float] | None = None,
    *,
    spec: MergeSpec | None = None,
    **options,
) -> MergeResult:
    """Merge LoRA adapters into one; by default dW = sum_k c_k s_k B_k A_k at every module.

    The options are MergeSpec's fields (nan_peft.spec), given as keywords or as `spec`:
    coefficients: "nan" (default; c_k proportional to ||dW_k||_F^-exponent, summing to `total`),
    "uniform", "manual" (with `weights`; the default when `weights` are given), or the weights themselves.
    method: the merge rule the coefficients are plugged into (nan_peft.rules.RULES): "task_arithmetic"
    (default, scale * sum_k c_k dW_k), "ties", "dare_linear", "dare_ties", "magnitude_prune", with their
    options density, scale (lambda), normalize, seed and majority_sign_method ("total" or "frequency": TIES
    sign election by mass or by vote). NAN norms are always those of the full updates.
    combine: "cat" (exact, rank = sum of ranks; the default for task_arithmetic) or "svd" (best
    rank-`rank` approximation; the default, and the only choice, for the entry-wise rules).
    Computation runs on `device`; the result is written in `dtype`, a float torch.dtype or its name
    ("bfloat16"; default: the inputs' dtype when they share one, else float32).
    """
    if spec is None:
        spec = MergeSpec(combine=combine, rank=rank, coefficients=coefficients, **options)
    elif combine is not None or rank is not None or coefficients is not None or options:
        raise NanPeftError("give the options either as spec= or as keywords, not both")
    return merge_sources(read_adapters(adapters, allow_different_bases=spec.allow_different_bases, allow_duplicates=spec.allow_duplicates), spec)


def merge_sources(sources: Sequence[LoraAdapter], spec: MergeSpec) -> MergeResult:
    """The merge of adapters already read and checked together (reader.read_adapters), as `spec` says:
    norms -> coefficients -> combine. merge_adapters is read_adapters followed by this. An svd of task arithmetic
    takes the coefficients from each adapter's own norms (norms.update_norms) and sums every module's R x R Grams
    once, for its truncation and for the inner products of the result's gram (whose diagonal is those norms)."""
    device = torch.device(spec.device)
    dtype = getattr(torch, spec.dtype) if spec.dtype else _common_dtype(sources)
    if _one_pass(spec):  # the coefficients from the norms alone, then one pass of Grams for the merge and the inner products
        norms = update_norms(sources, device)
        coeffs = coefficients_for(spec.coefficients, norms, **spec.provider_given)
        if bool((coeffs.values != 0)[norms.present].all()):
            inner = InnerProducts(sources)
            modules, report = combine_updates(sources, coeffs, None, spec.combine, spec.rank, device, dtype, spec.method, spec.rule_given,
                                              **spec.truncation_given, on_grams=inner.add)
            return _result(sources, coeffs, inner.result(norms), modules, report, spec.record_options(coeffs.granularity, dtype), spec)
    gram = update_gram(sources, device)
    coeffs = coefficients_for(spec.coefficients, gram, **spec.provider_given)
    options = spec.record_options(coeffs.granularity, dtype)
    if spec.scale == AUTO:  # the rule's merged norms at scale 1, uncalibrated (nan_peft.scale), then the merge at that scale
        check_combine(sources, coeffs, spec.combine, spec.rank, spec.method, spec.rule_given, **spec.truncation_given)
        measured = replace(spec, scale=None, calibrate=None)
        norms = merged_norms(sources, coeffs, gram, spec.method, measured.rule_given, device)
        options["scale_chosen"] = auto_scale(norms, gram.module_norms, coeffs.values)
        spec = replace(spec, scale=options["scale_chosen"])
    modules, report = combine_updates(
        sources, coeffs, gram, spec.combine, spec.rank, device, dtype, spec.method, spec.rule_given, **spec.truncation_given
    )
    return _result(sources, coeffs, gram, modules, report, options, spec)


def _one_pass(spec: MergeSpec) -> bool:
    """Whether the merge sums each module's Grams once for both the truncation and the inner products: svd of task
    arithmetic (the rule on the factors, no calibration) at a given scale (--scale auto measures the rule's merged norms first)."""
    return spec.combine == "svd" and spec.method in LOW_RANK and not spec.calibrate and spec.scale != AUTO


def _result(sources, coeffs, gram, modules, report, options, spec) -> MergeResult:
    if not modules:
        raise NanPeftError("every coefficient is zero: the merged update is empty")
    extras = {key: tensor for source in sources for key, tensor in source.extras.items()}  # equal across sources
    merged = LoraAdapter(name="merged", source="", config=_merged_config(sources), modules=modules, extras=extras)
    return MergeResult(merged, coeffs, gram, report, list(sources), options, spec)


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
