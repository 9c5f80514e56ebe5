"""Combine weighted LoRA updates into one LoRA module per path: exactly (cat) or truncated (svd)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .batching import CPU_CHUNK_BYTES, DEFAULT_BATCH_BYTES, Term
from .coefficients import Coefficients, contributions
from .errors import NanPeftError, all_finite
from .gram import pad_rank, tail_energy, truncate_dense
from .lora import LoraAdapter, LoraModule
from .norms import UpdateGram
from .core_space import core_merges, core_norms
from .rules import LOW_RANK, RULES, SPECTRAL, in_core_space, module_generator, rule_options
from .truncation import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS, DEFAULT_SKETCH_SEED, TRUNCATIONS, truncate_groups

COMBINES = ("cat", "svd")
MAX_PADDED_RANK = 1024  # zero padding up to a serving engine's rank is fine below this, whatever the module sizes


@dataclass(frozen=True)
class ModuleReport:
    """What the merge did at one module: the exact merged update's norm and what truncation discarded."""

    module: str
    input_rank: int
    rank: int
    norm: float
    discarded: float
    truncation: str = "none"
    """How it was truncated: "none" (cat), "gram" or "qr" (exact, from the stacked factors), "dense" (exact, the
    SVD of the dense update) or "randomized" (block Krylov range finder, sketch.py)."""

    @property
    def relative_discarded(self) -> float:
        """||dW - dW_r||_F / ||dW||_F (0 for an exact merge or an empty update)."""
        return self.discarded / self.norm if self.norm > 0 else 0.0


def weighted_terms(adapters: Sequence[LoraAdapter], coefficients: Coefficients, scale: float = 1.0) -> dict[str, list[Term]]:
    """Per module path, the terms (k, module, scale * c_k * s_k) of the adapters with a non-zero coefficient there."""
    terms = {}
    for m, path in enumerate(coefficients.modules):
        c = coefficients.values[m].tolist()
        terms[path] = [
            (k, a.modules[path], scale * c[k] * a.modules[path].scale)
            for k, a in enumerate(adapters)
            if path in a.modules and c[k] != 0
        ]
    return terms


def balanced_scales(module: LoraModule, weight: float) -> tuple[float, float]:
    """(t, weight / t): the weight of the term weight * B @ A split between A's rows and B's columns, so that
    t A and (weight / t) B have entries of comparable size. Folding all of weight into B (weight = c s, often
    1e-2 or less, times a B of 1e-4) pushes B's entries into float16's subnormal range; balanced, each factor
    carries the geometric mean of the magnitudes. t is the power of two nearest sqrt(|weight| rms(B) / rms(A))
    (sqrt(|weight|) where a factor is zero): scaling by it is exact, so only (weight / t) B rounds, once, and
    (t A) ((weight / t) B) = weight B A in any precision but for under/overflow."""
    if weight == 0:
        return 1.0, 0.0
    # norms in float32 at least: only the power of two nearest their ratio matters (a non-finite one falls back below)
    a, b = (float(torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))) / math.sqrt(t.numel()) for t in (module.A, module.B))
    ideal = abs(weight) * (b / a if a > 0 and b > 0 else 1.0)
    if not (math.isfinite(ideal) and ideal > 0):
        return 1.0, weight
    t = math.ldexp(1.0, round(0.5 * math.log2(ideal)))
    return t, weight / t


def stacked_factors(
    terms: Sequence[Term], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = ([w_1 B_1 / t_1 | ... | w_K B_K / t_K], [t_1 A_1; ...; t_K A_K]) in `dtype`, t_k from
    balanced_scales (powers of two): B @ A = sum_k w_k B_k A_k."""
    scales = [balanced_scales(module, weight) for _, module, weight in terms]
    B = torch.cat([module.B.to(device, dtype) * b for (_, module, _), (_, b) in zip(terms, scales)], dim=1)
    A = torch.cat([module.A.to(device, dtype) * a for (_, module, _), (a, _) in zip(terms, scales)])
    return B, A


def default_combine(rule: str) -> str:
    """cat for plain weighted sums and the spectral rules (exact), svd for rules whose result exists only densely."""
    return "cat" if rule in LOW_RANK or rule in SPECTRAL else "svd"


def combine(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    gram: UpdateGram | None,
    method: str | None = None,
    rank: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rule: str = "task_arithmetic",
    options: Mapping | None = None,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
    truncation: str = "auto",
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    sketch_seed: int = DEFAULT_SKETCH_SEED,
    on_grams: Callable | None = None,
) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """Merge the weighted updates c_k s_k B_k A_k of every module with `rule` into factors (B, A), scale 1.

    task_arithmetic, scale * sum_k c_k s_k B_k A_k, runs on the factors: "cat" stacks them,
    [w_1 B_1 / t_1 | ... | w_K B_K / t_K] @ [t_1 A_1; ...; t_K A_K] with w_k = scale c_k s_k and t_k the power
    of two that balances the two factors' magnitudes (balanced_scales), exact with rank sum_k r_k; "svd" keeps
    the best rank-`rank` approximation of that product (gram.truncate_low_rank) in float64 on `device`, never the
    dense matrix. Other rules (TIES, DARE, ...) act entry-wise, so each module's updates are built densely
    on `device`, one module at a time, merged, and truncated back to rank `rank` by SVD ("svd" only).
    Modules where every coefficient is 0 are left out (their update is zero); the discarded norm is reported.

    svd truncates each group of same-shaped modules by the path truncation_path picks: exactly from the R x R
    Grams (R = sum of the ranks; QR of the stacks where those are ill-conditioned), exactly by the SVD of the dense
    update where R >= min(m, n), or with a block Krylov range finder (`oversample` extra columns, `power_iterations`
    Krylov blocks after the first, test matrices seeded from `sketch_seed` and the module path) where the exact core
    would cost much more: from the Grams (sketch.randomized_from_grams) where R <= (m + n) / 4, else on the factored
    stacks (sketch.randomized_svd). `truncation` "exact" or "randomized" forces the choice. Whatever the path, the
    discarded norm is exact: on the randomized path ||dW - dW_r||^2 = ||dW||^2 - 2 <dW, dW_r> + ||dW_r||^2 in
    float64, from the Grams, or with ||dW|| from `gram` and the rest from products with the rank-`rank` result
    (truncation._discarded). ModuleReport.truncation records the path.

    on_grams (svd of task arithmetic only) receives every module's unweighted factor Grams from svd's own pass
    (truncation.truncate_groups), so that the caller sums the adapters' inner products (norms.InnerProducts) without a
    second pass over the factors; `gram` may then be None (the exact norms come from those Grams), and every adapter
    present at a module must have a non-zero coefficient there (the Grams are of the adapters merged).
    """
    method, params, seed = check_combine(adapters, coefficients, method, rank, rule, options, truncation, oversample, power_iterations, sketch_seed)
    if on_grams is not None and (method != "svd" or rule not in LOW_RANK or in_core_space(rule, params)):
        raise NanPeftError("on_grams serves the svd of task arithmetic only")
    if in_core_space(rule, params):
        return _core(adapters, coefficients, rule, params, seed, method, rank, device, dtype)
    if rule not in LOW_RANK:
        return _dense(adapters, coefficients, rule, options, rank, device, dtype)
    scale = params.get("scale", 1.0)
    terms = {path: t for path, t in weighted_terms(adapters, coefficients, scale).items() if t}
    norms = lambda: dict(zip(gram.modules, merged_norms(adapters, coefficients, gram, rule, options)))  # noqa: E731
    if method == "cat":
        return _cat(terms, norms(), rank, dtype)
    sketch = {"truncation": truncation, "oversample": oversample, "power_iterations": power_iterations, "seed": sketch_seed}
    truncated = truncate_groups(terms, rank, device, dtype, max_batch_bytes, norms, sketch, on_grams)
    paths = sorted(truncated)
    modules = {path: _like(terms[path][0][1], truncated[path].A, truncated[path].B, path) for path in paths}
    return modules, [ModuleReport(path, *truncated[path][2:]) for path in paths]


def check_combine(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    method: str | None,
    rank: int | None,
    rule: str = "task_arithmetic",
    options: Mapping | None = None,
    truncation: str = "auto",
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iterations: int = DEFAULT_POWER_ITERATIONS,
    sketch_seed: int = DEFAULT_SKETCH_SEED,
) -> tuple[str, dict, int | None]:
    """(combine method, the rule's parameters, its seed): combine's arguments checked before any work, so that a bad
    one fails at once (merge_sources checks them before --scale auto measures the rule)."""
    method = method or default_combine(rule)
    if truncation not in TRUNCATIONS:
        raise NanPeftError(f"unknown truncation {truncation!r}; choose from {', '.join(TRUNCATIONS)}")
    for name, value in (("oversample", oversample), ("power_iterations", power_iterations), ("sketch_seed", sketch_seed)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise NanPeftError(f"{name} must be a non-negative integer, got {value!r}")
    if method not in COMBINES:
        raise NanPeftError(f"unknown combine {method!r}; choose from {', '.join(COMBINES)}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise NanPeftError(f"rank must be a positive integer, got {rank!r}")
    if method == "svd" and rank is None:
        raise NanPeftError("svd needs a target rank (rank= / --rank)")
    largest = max((min(m.B.shape[0], m.A.shape[1]) for a in adapters for m in a.modules.values()), default=0)
    if rank is not None and rank > max(largest, MAX_PADDED_RANK):
        raise NanPeftError(f"rank {rank} is out of range: no merged module can have a rank above {largest}, and padding stops at {MAX_PADDED_RANK}")
    params, seed = rule_options(rule, options or {})
    if rule not in LOW_RANK and not in_core_space(rule, params) and method != "svd":
        raise NanPeftError(f"the {rule} rule gives dense updates: combine them with svd and a rank, not {method}")
    if method == "cat" and rank is not None:
        needed = max((sum(mod.rank for mod in modules) for _, modules, _ in contributions(adapters, coefficients)), default=0)
        if rank < needed:
            raise NanPeftError(f"cat is exact and needs rank >= {needed} (the sum of the ranks); use svd to truncate to {rank}")
    return method, params, seed


def _cat(terms, norms, rank, dtype):
    input_ranks = {path: sum(m.rank for _, m, _ in t) for path, t in terms.items()}
    rank = rank or max(input_ranks.values(), default=0)
    merged, report = {}, []
    buffer = torch.empty(CPU_CHUNK_BYTES // 8, dtype=torch.float64)
    for path, path_terms in terms.items():
        B, A = _cat_factors(path_terms, rank, dtype, buffer)
        merged[path] = _like(path_terms[0][1], A, B, path)
        report.append(ModuleReport(path, input_ranks[path], input_ranks[path], norms[path], 0.0))
    return merged, report


def _cat_factors(terms: Sequence[Term], rank: int, dtype: torch.dtype, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pad_rank(*stacked_factors(terms), rank) cast to `dtype`, the same numbers, written straight into the
    output: each t_k A_k and (w_k / t_k) B_k (balanced_scales) is formed in float64 a piece at a time in
    `buffer` (cache-sized) and rounded once."""
    m, n = terms[0][1].B.shape[0], terms[0][1].A.shape[1]
    A = torch.zeros((rank, n), dtype=dtype)
    B = torch.zeros((m, rank), dtype=dtype)
    size = buffer.numel()
    offset = 0
    for _, module, weight in terms:
        r = module.rank
        a_scale, b_scale = balanced_scales(module, weight)
        source, target = module.A.reshape(-1), A[offset : offset + r].view(-1)  # whole rows: contiguous
        for begin in range(0, source.numel(), size):
            values = source[begin : begin + size]
            target[begin : begin + size].copy_(buffer[: values.numel()].copy_(values).mul_(a_scale))
        step = max(1, size // r)
        for begin in range(0, m, step):
            rows = module.B[begin : begin + step]
            B[begin : begin + step, offset : offset + r].copy_(buffer[: rows.numel()].view(rows.shape).copy_(rows).mul_(b_scale))
        offset += r
    return B, A


def dense_updates(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    rule: str = "task_arithmetic",
    options: Mapping | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> Iterator[tuple[str, list[LoraModule], torch.Tensor]]:
    """Yield (path, contributing modules, merged update as an (m, n) matrix in `dtype` on `device`) one
    module at a time, for any rule: what the fold path adds to base weights (in float32), and what svd
    truncates for the entry-wise rules (in float64). Memory: the K dense updates of one module."""
    params, seed = rule_options(rule, options or {})
    if in_core_space(rule, params):  # exact in the core space: the merged factors' product
        for path, modules, B, A, _ in core_merges(adapters, coefficients, rule, params, seed, None, device):
            yield path, modules, (B @ A).to(dtype)
        return
    if rule in LOW_RANK:
        for path, terms in weighted_terms(adapters, coefficients, params.get("scale", 1.0)).items():
            if terms:
                B, A = stacked_factors(terms, device, dtype)
                yield path, [module for _, module, _ in terms], B @ A
        return
    for path, modules, c in contributions(adapters, coefficients):
        deltas = torch.stack([mod.scale * (mod.B.to(device, dtype) @ mod.A.to(device, dtype)) for mod in modules])
        generator = module_generator(seed, path) if seed is not None else None
        yield path, modules, RULES[rule](deltas, c.to(device), generator, **params)


def merged_norms(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    gram: UpdateGram,
    rule: str = "task_arithmetic",
    options: Mapping | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """||M_m||_F of the modules' merged updates under `rule` and `options` (a module whose coefficients are all 0
    is left out or counts 0), without the merged factors: what --scale auto measures (nan_peft.scale) and what
    task arithmetic's report gives. Task arithmetic from the Grams, |scale| ||sum_k c_k dW_k|| (every module of
    `gram`); the rules in the core space from the rule's core result (core_space.core_norms: no SVD, no output
    products); the entry-wise rules from the dense merged update (no SVD)."""
    params, seed = rule_options(rule, options or {})
    if in_core_space(rule, params):
        return [norm for _, _, norm in core_norms(adapters, coefficients, rule, params, seed, device)]
    if rule in LOW_RANK:
        return (abs(params.get("scale", 1.0)) * gram.merged_norms(coefficients.values)).tolist()
    return [float(torch.linalg.matrix_norm(update)) for _, _, update in dense_updates(adapters, coefficients, rule, options, device)]


def _core(adapters, coefficients, rule, params, seed, method, rank, device, dtype):
    """The spectral rules (and task_arithmetic with calibrate) in each module's core space (core_space.core_merges):
    exact (cat: rank R, the largest sum of the ranks, or `rank` above it, zero-padded) or the optimal truncation
    to `rank` (svd), its discarded norm from the merged update's singular values."""
    merged, report = {}, []
    for path, modules, B, A, S in core_merges(adapters, coefficients, rule, params, seed, rank if method == "svd" else None, device):
        R = sum(mod.rank for mod in modules)
        S = S.cpu()
        kept = B.shape[-1] if method == "cat" else rank
        merged[path] = (modules[0], A.to("cpu", dtype), B.to("cpu", dtype))
        report.append(ModuleReport(path, R, int((S[:kept] > 0).sum()), float(S.square().sum().sqrt()), float(tail_energy(S, kept)), "core"))
    width = rank or max((B.shape[-1] for _, _, B in merged.values()), default=0)
    return {path: _like(mod, *reversed(pad_rank(B, A, width)), path) for path, (mod, A, B) in merged.items()}, report


def _dense(adapters, coefficients, rule, options, rank, device, dtype):
    merged, report = {}, []
    for path, modules, update in dense_updates(adapters, coefficients, rule, options, device):
        B, A, S = truncate_dense(update, rank)
        S = S.cpu()
        merged[path] = _like(modules[0], A.to("cpu", dtype), B.to("cpu", dtype), path)
        kept = int((S[:rank] > 0).sum())
        report.append(ModuleReport(path, sum(mod.rank for mod in modules), kept, float(S.square().sum().sqrt()), float(tail_energy(S, rank))))
    return merged, report


def _like(template: LoraModule, A: torch.Tensor, B: torch.Tensor, path: str) -> LoraModule:
    """The merged factors as a module laid out like `template`; refuses factors the output dtype cannot hold."""
    if not (all_finite(A) and all_finite(B)):
        dtype = str(B.dtype).removeprefix("torch.")
        fix = "merge with dtype=float32 (--dtype float32)" if B.element_size() < 4 else "check the adapters' scales and the merge's options"
        raise NanPeftError(f"the merged factors of {path} overflow {dtype}; {fix}")
    return LoraModule(A.contiguous(), B.contiguous(), 1.0, template.kind, template.a_tail, template.b_tail, template.fan_in_fan_out)
