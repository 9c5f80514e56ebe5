"""Combine weighted LoRA updates into one LoRA module per path: exactly (cat) or truncated (svd)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .batching import (
    CPU_CHUNK_BYTES, DEFAULT_BATCH_BYTES, Group, Term, _stack, chunk_bytes, groups, modules_per_piece, stacked_chunks,
)
from .coefficients import Coefficients
from .errors import NanPeftError
from .gram import canonical_signs, pad_rank, tail_energy, truncate_dense, truncate_low_rank, truncation_from_grams
from .lora import LoraAdapter, LoraModule
from .norms import UpdateGram, factor_grams
from .rules import LOW_RANK, RULES, module_generator, rule_options

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
    """cat for plain weighted sums (exact), svd for rules whose result exists only densely."""
    return "cat" if rule in LOW_RANK else "svd"


def combine(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    gram: UpdateGram,
    method: str | None = None,
    rank: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    rule: str = "task_arithmetic",
    options: Mapping | None = None,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """Merge the weighted updates c_k s_k B_k A_k of every module with `rule` into factors (B, A), scale 1.

    task_arithmetic, scale * sum_k c_k s_k B_k A_k, runs on the factors: "cat" stacks them,
    [w_1 B_1 / t_1 | ... | w_K B_K / t_K] @ [t_1 A_1; ...; t_K A_K] with w_k = scale c_k s_k and t_k the power
    of two that balances the two factors' magnitudes (balanced_scales), exact with rank sum_k r_k; "svd" keeps
    the best rank-`rank` approximation of that product (gram.truncate_low_rank) in float64 on `device`, never the
    dense matrix. Other rules (TIES, DARE, ...) act entry-wise, so each module's updates are built densely
    on `device`, one module at a time, merged, and truncated back to rank `rank` by SVD ("svd" only).
    Modules where every coefficient is 0 are left out (their update is zero); the discarded norm is reported.
    """
    method = method or default_combine(rule)
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
    if rule not in LOW_RANK:
        if method != "svd":
            raise NanPeftError(f"the {rule} rule gives dense updates: combine them with svd and a rank, not {method}")
        return _dense(adapters, coefficients, rule, options, rank, device, dtype)
    scale = params.get("scale", 1.0)
    terms = {path: t for path, t in weighted_terms(adapters, coefficients, scale).items() if t}
    if method == "cat":
        norms = dict(zip(gram.modules, (abs(scale) * gram.merged_norms(coefficients.values)).tolist()))
        return _cat(terms, norms, rank, dtype)
    return _svd(terms, rank, device, dtype, max_batch_bytes)


def _cat(terms, norms, rank, dtype):
    input_ranks = {path: sum(m.rank for _, m, _ in t) for path, t in terms.items()}
    needed = max(input_ranks.values(), default=0)
    if rank is not None and rank < needed:
        raise NanPeftError(f"cat is exact and needs rank >= {needed} (the sum of the ranks); use svd to truncate to {rank}")
    rank = rank or needed
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


def _svd(terms, rank, device, dtype, max_batch_bytes):
    """Truncate every module's cat form to `rank` from the Gram matrices of its stacked factors
    (gram.truncation_from_grams): two passes over the factors, converted to float64 a cache-sized piece at a
    time, no QR of the tall stacks, and the small R x R algebra batched over a whole group of same-shaped
    modules. Modules whose Grams are too ill-conditioned for that (rank-deficient stacks: the same adapter
    twice, more rank than rows) are truncated by QR of their stacks (gram.truncate_low_rank)."""
    merged, report = {}, {}
    piece_bytes = min(chunk_bytes(device), max_batch_bytes)
    buffer = torch.empty(piece_bytes // 8, dtype=torch.float64, device=device)
    for group in groups(terms):
        B, A, S = _truncate_group(group, rank, dtype, buffer)
        for g in (~torch.isfinite(S).all(-1)).nonzero().flatten().tolist():  # marked ill-conditioned: QR
            path = group.paths[g]
            A_full, B_full = _stack([terms[path]], group.ranks, group.n, group.m, device, torch.float64)
            B_qr, A_qr, singular = (x[0] for x in truncate_low_rank(B_full, A_full, rank))
            B[g], A[g] = B_qr.to("cpu", dtype), A_qr.to("cpu", dtype)
            S[g] = torch.nn.functional.pad(singular.cpu(), (0, S.shape[-1] - singular.shape[-1]))
        norms, discarded = S.square().sum(-1).sqrt().tolist(), tail_energy(S, rank).tolist()
        kept = (S[:, :rank] > 0).sum(-1).tolist()
        for g, path in enumerate(group.paths):
            merged[path] = _like(terms[path][0][1], A[g], B[g], path)
            report[path] = ModuleReport(path, group.rank, kept[g], norms[g], discarded[g])
    paths = sorted(merged)
    return {p: merged[p] for p in paths}, [report[p] for p in paths]


def _truncate_group(group: Group, rank: int, dtype: torch.dtype, buffer: torch.Tensor):
    """(B_r (G, m, rank), A_r (G, rank, n)) in `dtype` on the CPU and S (G, R) float64 for every module of the
    group, by truncation_from_grams; S is NaN where that was not accurate enough (the caller uses QR there).

    Pass 1 sums the Grams piece by piece; the R x R algebra runs once for the group; pass 2 forms
    B_r = B Pb piece by piece and picks canonical signs (gram.canonical_signs: the largest entry of each
    column of B_r positive) as it goes; pass 3 forms A_r = Pa A with those signs."""
    G, m, n = len(group.paths), group.m, group.n
    step = modules_per_piece(group, buffer.element_size(), buffer.numel() * buffer.element_size())
    starts = range(0, G, step)
    grams = [factor_grams(group, buffer, start, start + step) for start in starts]
    weights = group.weights(device=buffer.device)  # B = [w_1 B_1 | ...]: scale B^T B, then Pb's rows
    BtB = torch.cat([BtB for _, BtB in grams]) * weights.unsqueeze(-1) * weights.unsqueeze(-2)
    Pb, Pa, S, ok = truncation_from_grams(torch.cat([AAt for AAt, _ in grams]), BtB, rank)
    Pb = Pb * weights.unsqueeze(-1)
    k = Pb.shape[-1]
    allocate = torch.zeros if k < rank else torch.empty
    B, A = allocate((G, m, rank), dtype=dtype), allocate((G, rank, n), dtype=dtype)
    largest = buffer.new_full((G, k), -1.0)
    sign = buffer.new_ones((G, k))
    for start in starts:
        stop = start + step
        for rows, piece in stacked_chunks(group, "B", buffer, start, stop):
            product = torch.bmm(piece, Pb[start:stop])
            size, where = product.abs().max(dim=-2)
            better = size > largest[start:stop]
            largest[start:stop] = torch.where(better, size, largest[start:stop])
            found = torch.gather(product, -2, where.unsqueeze(-2)).squeeze(-2)
            sign[start:stop] = torch.where(better, torch.where(found < 0, -1.0, 1.0), sign[start:stop])
            B[start:stop, rows, :k] = product
    B[..., :k] *= sign.unsqueeze(-2).to("cpu", dtype)
    Pa = Pa * sign.unsqueeze(-1)
    for start in starts:
        for columns, piece in stacked_chunks(group, "A", buffer, start, start + step):
            A[start : start + step, :k, columns] = torch.bmm(Pa[start : start + step], piece)
    return B, A, torch.where(ok.unsqueeze(-1), S, torch.nan).cpu()


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
    if rule in LOW_RANK:
        for path, terms in weighted_terms(adapters, coefficients, params.get("scale", 1.0)).items():
            if terms:
                B, A = stacked_factors(terms, device, dtype)
                yield path, [module for _, module, _ in terms], B @ A
        return
    for m, path in enumerate(coefficients.modules):
        c = coefficients.values[m]
        members = [k for k, a in enumerate(adapters) if path in a.modules and c[k] != 0]
        if not members:
            continue
        modules = [adapters[k].modules[path] for k in members]
        deltas = torch.stack([mod.scale * (mod.B.to(device, dtype) @ mod.A.to(device, dtype)) for mod in modules])
        generator = module_generator(seed, path) if seed is not None else None
        yield path, modules, RULES[rule](deltas, c[members].to(device), generator, **params)


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
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        dtype = str(B.dtype).removeprefix("torch.")
        fix = "merge with dtype=float32 (--dtype float32)" if B.element_size() < 4 else "check the adapters' scales and the merge's options"
        raise NanPeftError(f"the merged factors of {path} overflow {dtype}; {fix}")
    return LoraModule(A.contiguous(), B.contiguous(), 1.0, template.kind, template.a_tail, template.b_tail, template.fan_in_fan_out)
