"""Extract a LoRA adapter from a full fine-tune: at every Linear, Conv1D and Embedding weight, the best rank-k
approximation of its task vector tau = W_ft - W_base (Eckart-Young: tau = U S V^T, keep the top k singular
triplets; ||tau - tau_k||_F^2 = sum_{i > k} S_i^2 is the discarded norm, reported per module).

k is --rank R (at most min(m, n)), or with --energy F the smallest k with sum_{i <= k} S_i^2 >= F ||tau||_F^2 (and
at most R when both are given). The SVD is exact (LAPACK, float64) where it is cheap or asked for, else a seeded
block Krylov range finder (sketch.randomized_svd; the same cost model as the svd merge, truncation.truncation_path).
The factors are split evenly, B = U_k S_k^1/2, A = S_k^1/2 V_k^T, and laid out as peft applies them: B A = tau for a
Linear weight (out, in), B A = tau^T for a Conv1D weight (in, out: fan_in_fan_out) and for an Embedding weight
(num_embeddings, dim: lora_embedding_A is (k, num_embeddings)). A weight the model ties to another (GPT-2's wte and
lm_head) gets a LoRA on each of its layers, from one SVD. The discarded norm is computed for the factors as written,
in float64: ||tau - B A||_F.

Tensors are read one at a time from each checkpoint's shards (fold.checkpoint.TensorReader): memory holds about one
tensor in float64 and its SVD, whatever the model size. The adapter is written by the servable writer (writer.py,
published atomically) with extract_record.json and a model card beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__, hub
from .errors import NanPeftError
from .fold.architecture import architecture
from .fold.checkpoint import FLOATS, TensorReader, resolve_base
from .full.inputs import plan_full
from .gram import canonical_signs, split_singular, truncate_dense
from .lora import LoraAdapter, LoraModule
from .record import CARD_NAME, RECORD_FORMAT, front_matter, record_json
from .sketch import randomized_svd, seeded_gaussians
from .spec import ExtractSpec
from .truncation import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS, DEFAULT_SKETCH_SEED, truncation_path
from .writer import servable_rank, write_adapter

EXTRACT_RECORD_NAME = "extract_record.json"
_BLOCK = 1 << 22  # entries of a left-out tensor's task vector in float64 at a time (32 MiB)
_ENERGY_TOLERANCE = 1e-12  # relative: a rank whose kept energy falls short of F ||tau||^2 by rounding alone is enough


@dataclasses.dataclass(frozen=True)
class Target:
    """One stored tensor to extract and the layers it feeds: [(module path, kind)], kind linear, conv1d or embedding."""

    tensor: str
    shape: tuple[int, ...]
    modules: tuple[tuple[str, str], ...]


@dataclasses.dataclass
class ExtractPlan:
    """What extract_lora reads, decided from headers and configs before any tensor is read."""

    fine_tune: Path
    base: Path
    checkpoints: tuple  # (fine-tune, base) Checkpoints
    config: dict
    targets: list[Target]
    others: dict[str, str]
    """Float tensors not extracted -> why; listed in the record (with their task vector's norm) when the fine-tune changed them."""


@dataclasses.dataclass(frozen=True)
class ModuleReport:
    module: str
    tensor: str
    rank: int
    norm: float
    discarded: float
    truncation: str

    @property
    def relative_discarded(self) -> float:
        return self.discarded / self.norm if self.norm else 0.0


@dataclasses.dataclass
class Extraction:
    """An extracted adapter (scale 1 per module), its report per module, and what a LoRA could not carry."""

    adapter: LoraAdapter
    report: list[ModuleReport]
    left_out: list[dict]
    unchanged: int
    spec: ExtractSpec
    dtype: torch.dtype
    inputs: dict[str, tuple[str, Path]]
    """{"fine_tune" | "base": (as given, the folder read)}."""

    @property
    def rank(self) -> int:
        return servable_rank(self.adapter)

    def save_pretrained(self, output: str | os.PathLike, overwrite: bool = False, command: Sequence[str] = ()) -> Path:
        """Write the adapter, extract_record.json and README.md to `output`, atomically."""
        record = extract_record(self, command)
        files = {EXTRACT_RECORD_NAME: record_json(record), CARD_NAME: extract_card(self, record, str(output))}
        protected = [folder for _, folder in self.inputs.values()]
        return write_adapter(self.adapter, output, overwrite=overwrite, extra_files=files, protected=protected)


def selected(path: str, patterns: Sequence[str]) -> bool:
    """Whether --modules picks the module `path`. The rule of mergekit 0.1.5's mergekit-extract-lora
    (mergekit/scripts/extract_lora.py, plan_extraction._should_extract): a module is extracted when some include regex
    matches it (re.search), or none is given, and no exclude regex matches it; here an exclude is written !REGEX."""
    includes = [p for p in patterns if not p.startswith("!")]
    excludes = [p[1:] for p in patterns if p.startswith("!")]
    if includes and not any(re.search(p, path) for p in includes):
        return False
    return not any(re.search(p, path) for p in excludes)


def plan_extraction(fine_tune: Path, base: Path, spec: ExtractSpec) -> ExtractPlan:
    """Check that `fine_tune` is a fine-tune of `base` (architecture, tensor names, shapes, float dtypes) and pick the
    tensors to extract and the layers each one feeds, from the model class (fold.architecture)."""
    full = plan_full(base, [fine_tune], {})  # the checks of a full-checkpoint merge: same architecture, names, shapes, dtypes
    ft_checkpoint, base_checkpoint, config = full.sources[0].checkpoint, full.base, full.config
    built = architecture(config)
    if built is None:
        raise NanPeftError(f"{fine_tune}: transformers cannot build {config.get('architectures')}: cannot tell its Linear, Conv1D "
                           "and Embedding weights apart")
    kinds = {**dict.fromkeys(built.linear, "linear"), **dict.fromkeys(built.transposed, "conv1d"),
             **dict.fromkeys(built.embeddings, "embedding")}
    names = {key: built.rename(key) or key for key in ft_checkpoint.tensors}
    stored = set(names.values())
    twins: dict[str, list[str]] = {}  # a stored weight -> the tied weights it stands for (not stored themselves)
    for group in built.tied:
        held = [name for name in group if name in stored]
        if held:
            twins.setdefault(held[0], []).extend(name for name in group if name not in stored)
    targets, others = [], {}
    order = sorted(ft_checkpoint.tensors.items(), key=lambda item: (item[1].file, item[1].begin))  # read in file order
    for key, entry in order:
        if entry.dtype not in FLOATS:
            continue
        users = [name for name in (names[key], *twins.get(names[key], ())) if name in kinds]
        modules = tuple((name.removesuffix(".weight"), kinds[name]) for name in users
                        if len(entry.shape) == 2 and selected(name.removesuffix(".weight"), spec.modules))
        if modules:
            targets.append(Target(key, entry.shape, modules))
        elif len(entry.shape) != 2:
            others[key] = f"{len(entry.shape)}-D (a norm, bias or buffer): a LoRA updates 2-D weights"
        else:
            others[key] = "excluded by --modules" if users else "not the weight of a Linear, Conv1D or Embedding layer"
    if not targets:
        raise NanPeftError(f"{fine_tune}: no Linear, Conv1D or Embedding weight to extract"
                           + (f" (--modules {' '.join(spec.modules)} matches none)" if spec.modules else ""))
    return ExtractPlan(fine_tune, base, (ft_checkpoint, base_checkpoint), config, targets, others)


def factors(tau: torch.Tensor, spec: ExtractSpec, path: str, squared: float) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(P (m, k), Q (k, n), how): the best rank-k approximation P Q of the float64 task vector tau (m, n), whose
    squared norm is `squared`, found by
    `how` ("dense": LAPACK SVD; "randomized": sketch.randomized_svd seeded by (sketch_seed, path)), k as the spec
    says (module docstring), singular values split evenly between P and Q."""
    m, n = tau.shape
    cap = min(spec.rank or min(m, n), m, n)
    oversample = DEFAULT_OVERSAMPLE if spec.oversample is None else spec.oversample
    iterations = DEFAULT_POWER_ITERATIONS if spec.power_iterations is None else spec.power_iterations
    how = truncation_path(m, n, min(m, n), cap, spec.truncation or "auto", oversample, iterations)
    if how == "dense":
        P, Q, S = truncate_dense(tau, cap)
    else:
        L, S, Rt = _randomized(tau, cap, path, oversample, iterations, DEFAULT_SKETCH_SEED if spec.sketch_seed is None else spec.sketch_seed)
        P, Q = split_singular(L, S, Rt, cap)
    k = energy_rank(S, squared, spec.energy, cap)
    return P[:, :k], Q[:k], how


def _squared_norm(tensor: torch.Tensor) -> float:
    """||tensor||_F^2 in one pass (a dot product: no squared copy)."""
    flat = tensor.reshape(-1)
    return float(torch.dot(flat, flat))


def energy_rank(S: torch.Tensor, total: float, energy: float | None, cap: int) -> int:
    """The smallest k <= cap with sum_{i <= k} S_i^2 >= energy * total (total = ||tau||_F^2), or cap without energy."""
    if energy is None:
        return cap
    kept = torch.cumsum(S.to(torch.float64).square(), 0)
    return max(1, min(cap, int((kept < energy * total * (1 - _ENERGY_TOLERANCE)).sum()) + 1))


def _randomized(tau: torch.Tensor, rank: int, path: str, oversample: int, iterations: int, seed: int):
    """(L, S, Rt) of tau from the block Krylov range finder, its products in float32 (float64 for a float64
    checkpoint is not worth it: the exact discarded norm is computed afterwards); bases on the shorter side, as
    truncation._truncate_stacked does."""
    m, n = tau.shape
    M = tau.to(torch.float32).unsqueeze(0)
    omega = seeded_gaussians([path], max(m, n), min(rank + oversample, m, n), seed, M.dtype, M.device)
    apply, apply_t = (lambda X: M @ X), (lambda Y: M.mT @ Y)
    if m > n:
        left, S, right = randomized_svd(apply_t, apply, omega, rank, iterations)
        L, Rt = canonical_signs(right.mT, left.mT)
    else:
        L, S, Rt = randomized_svd(apply, apply_t, omega, rank, iterations)
    return L[0], S[0], Rt[0]


def extract_lora(fine_tune: str | os.PathLike, base: str | os.PathLike, spec: ExtractSpec | None = None, **options) -> Extraction:
    """The LoRA adapter of `fine_tune` over `base` (folders or Hub ids of transformers safetensors checkpoints), as the
    module docstring says; options are ExtractSpec's fields (rank=..., energy=..., modules=[...], ...)."""
    spec = spec or ExtractSpec(**options)
    folders = resolve_base(fine_tune), resolve_base(base)
    plan = plan_extraction(*folders, spec)
    ft_checkpoint, base_checkpoint = plan.checkpoints
    stored = {ft_checkpoint.tensors[t.tensor].dtype for t in plan.targets}
    dtype = getattr(torch, spec.dtype) if spec.dtype else FLOATS[stored.pop()] if len(stored) == 1 else torch.float32
    modules, report, left_out, unchanged = {}, [], [], 0
    device = torch.device(spec.device)
    with TensorReader(ft_checkpoint) as tuned, TensorReader(base_checkpoint) as original:

        def difference(name: str, ft: torch.Tensor, base_: torch.Tensor) -> tuple[torch.Tensor, float]:
            """(ft - base_ in float64 on the device, its squared norm), refusing NaN and Inf: one of them makes the sum
            of squares non-finite (a float64 square of a float32 or bfloat16 difference cannot overflow)."""
            tau = ft.to(device, torch.float64)
            tau -= base_.to(device, torch.float64)  # in place: two float64 tensors at most
            squared = _squared_norm(tau)
            if not math.isfinite(squared):
                raise NanPeftError(f"tensor {name}: NaN or Inf in the fine-tune {fine_tune} or the base {base}")
            return tau, squared

        for target in plan.targets:
            tau, squared = difference(target.tensor, tuned.read(target.tensor), original.read(target.tensor))
            norm = squared**0.5
            if norm == 0:
                unchanged += 1
                continue
            P, Q, how = factors(tau, spec, target.tensor, squared)
            P, Q = P.to(dtype), Q.to(dtype)
            discarded = _squared_norm(tau.addmm_(P.to(torch.float64), Q.to(torch.float64), alpha=-1)) ** 0.5
            P, Q = P.cpu(), Q.cpu()
            for path, kind in target.modules:
                if kind == "linear":  # B A = tau
                    modules[path] = LoraModule(Q.contiguous(), P.contiguous(), 1.0)
                else:  # B A = tau^T: Conv1D (in, out) and Embedding (num_embeddings, dim) weights
                    modules[path] = LoraModule(P.T.contiguous(), Q.T.contiguous(), 1.0, "embedding" if kind == "embedding" else "linear",
                                               fan_in_fan_out=kind == "conv1d")
                report.append(ModuleReport(path, target.tensor, P.shape[1], norm, discarded, how))
        for name, why in plan.others.items():  # only their norms: a block of entries at a time (an embedding left out)
            blocks = zip(tuned.blocks(name, _BLOCK), original.blocks(name, _BLOCK))
            norm = sum(difference(name, ft, base_)[1] for ft, base_ in blocks) ** 0.5
            if norm:
                left_out.append({"tensor": name, "norm": norm, "why": why})
    if not modules:
        raise NanPeftError(f"{fine_tune} equals the base {base} at every weight extracted: nothing to extract")
    architectures = " ".join(plan.config.get("architectures") or [])
    task = "CAUSAL_LM" if "CausalLM" in architectures or "LMHeadModel" in architectures else None
    config = {"base_model_name_or_path": str(base), "task_type": task}
    adapter = LoraAdapter(Path(str(fine_tune)).name, "", config, modules)
    inputs = {"fine_tune": (str(fine_tune), folders[0]), "base": (str(base), folders[1])}
    return Extraction(adapter, report, left_out, unchanged, spec, dtype, inputs)


def extract_record(extraction: Extraction, command: Sequence[str] = ()) -> dict:
    """extract_record.json: version, command, inputs (as given, with the Hub commit read), options as used, the rank
    written, and per module its rank, ||tau||_F, the discarded ||tau - B A||_F and the SVD path; totals over the
    tensors extracted (a tied weight counted once); the tensors the fine-tune changed that the adapter does not carry."""
    spec = extraction.spec
    inputs = {}
    for key, (given, folder) in extraction.inputs.items():
        inputs[key] = {"path": given}
        source = hub.provenance(given, folder)
        if source is not None:
            inputs[key]["hub"] = source
    tensors = {entry.tensor: entry for entry in extraction.report}
    norm = sum(entry.norm**2 for entry in tensors.values()) ** 0.5
    discarded = sum(entry.discarded**2 for entry in tensors.values()) ** 0.5
    return {
        "format": RECORD_FORMAT,
        "nan_peft_version": __version__,
        "command": list(command),
        **inputs,
        "options": {"rank": spec.rank, "energy": spec.energy, "modules": list(spec.modules), "truncation": spec.truncation or "auto",
                    "oversample": DEFAULT_OVERSAMPLE if spec.oversample is None else spec.oversample,
                    "power_iterations": DEFAULT_POWER_ITERATIONS if spec.power_iterations is None else spec.power_iterations,
                    "sketch_seed": DEFAULT_SKETCH_SEED if spec.sketch_seed is None else spec.sketch_seed,
                    "dtype": str(extraction.dtype).removeprefix("torch."), "device": spec.device},
        "rank": extraction.rank,
        "norm": norm,
        "discarded": discarded,
        "relative_discarded": discarded / norm if norm else 0.0,
        "modules": [{"module": e.module, "tensor": e.tensor, "rank": e.rank, "norm": e.norm, "discarded": e.discarded,
                     "relative_discarded": e.relative_discarded, "truncation": e.truncation} for e in extraction.report],
        "left_out": extraction.left_out,
        "unchanged": extraction.unchanged,
    }


def extract_card(extraction: Extraction, record: dict, output: str) -> str:
    """README.md: what the adapter was extracted from, how well it reproduces the fine-tune, how to load it."""
    base = record["base"]["path"]
    base_id = hub.model_id(base)
    metadata = {"library_name": "peft", "pipeline_tag": "text-generation" if extraction.adapter.config["task_type"] else None,
                "tags": ["lora", "nan-peft", "extracted"]}
    if base_id:
        metadata.update(base_model=base_id, base_model_relation="adapter")
    worst = max(extraction.report, key=lambda e: e.relative_discarded)
    left = f" It leaves out {len(record['left_out'])} changed tensors a LoRA cannot carry (listed in {EXTRACT_RECORD_NAME})." if record["left_out"] else ""
    lines = [
        *front_matter(metadata),
        "",
        "# Extracted LoRA adapter",
        "",
        f"Made by nan-peft {record['nan_peft_version']} from the full fine-tune `{record['fine_tune']['path']}` of `{base}`: at each of "
        f"{len(extraction.report)} modules, the best rank-k approximation of the task vector W_ft - W_base (rank {record['rank']} "
        f"written). Relative discarded norm {record['relative_discarded']:.3g} over all modules, largest {worst.relative_discarded:.3g} "
        f"(`{worst.module}`).{left}",
        "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base_model, {json.dumps(output)})",
        "```",
        "",
        f"{EXTRACT_RECORD_NAME} holds every module's rank and discarded norm; the command that made it:",
        "",
        "```",
        shlex.join(record["command"]) or "nan_peft.extract.extract_lora(...) (from Python: no command)",
        "```",
        "",
    ]
    return "\n".join(lines)
