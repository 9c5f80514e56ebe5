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
from .gram import canonical_signs, pad_rank, split_singular, tail_energy, truncate_dense, truncate_low_rank, truncation_from_grams
from .lora import LoraAdapter, LoraModule
from .norms import UpdateGram, factor_grams
from .core_space import core_merges
from .rules import LOW_RANK, RULES, SPECTRAL, in_core_space, module_generator, rule_options
from .sketch import factored, randomized_svd, seeded_gaussians

COMBINES = ("cat", "svd")
MAX_PADDED_RANK = 1024  # zero padding up to a serving engine's rank is fine below this, whatever the module sizes

# How svd truncates a module (the `truncation` option): "exact" is the optimum (Eckart-Young), "randomized" a block
# Krylov range finder (sketch.py) within a measured 1e-3 of it, "auto" picks by cost (truncation_path).
TRUNCATIONS = ("auto", "exact", "randomized")
DEFAULT_OVERSAMPLE = 16  # l = rank + 16 columns per Krylov block
DEFAULT_POWER_ITERATIONS = 4  # 5 blocks: within 4e-4 / 7e-4 of the optimal discarded norm for 64 / 256 merged
# 7B-shaped adapters truncated to rank 64 (a flat spectrum, the hard case: sigma_64 = 0.87 sigma_1); 3 gives 1.5e-3
DEFAULT_SKETCH_SEED = 0

# The cost model behind truncation="auto", in flops of one module (m x n, R = sum of the stacked ranks, k the rank
# asked for, l = k + oversample columns, q power iterations):
#   gram (exact)  2 (m + n) R^2 for the two R x R Grams + CORE_FLOPS R^3 for their Cholesky factors, the triangular
#                 inverses and the SVD of the R x R core, work that runs far below the GEMM rate: one R^3 counts
#                 as CORE_FLOPS GEMM flops. Measured here (2 cores, 4096 x 4096, k = 64): R = 512 exact 0.18 s vs
#                 randomized 0.26 s, R = 1024 0.68 s vs 0.31 s, R = 2048 4.9 s vs 0.83 s.
#   dense (exact) 2 m n R to form the update + CORE_FLOPS m n min(m, n) for its SVD; taken instead of gram where
#                 R >= min(m, n): the stacked factors are then rank-deficient (the Gram path cannot factor them)
#                 and the dense update is no bigger than the stacks.
#   randomized    2 (q + 1) products with l columns, each 2 (m + n) R l, plus (q + 1) orthonormalisations and a
#                 (q + 1) l eigenproblem: ~4 (q + 1) (m + n) R l.
# Below MIN_RANDOMIZED_RANK auto stays exact (see there).
# auto takes randomized where the exact path would cost more than RANDOMIZED_SAVING times as much (the exact result
# is optimal, so the approximation must buy a real saving), and never where the Krylov space would span the module
# ((q + 1) l >= min(m, n)) or where nothing is truncated (R <= k). With the defaults (l = 80, q = 4) the switch comes
# at R = 807 for 4096 x 4096 modules (51 adapters of rank 16) and R = 974 for 11008 x 4096 (485 there at k = 16).
CORE_FLOPS = 20.0
RANDOMIZED_SAVING = 2.0
# Below this R the exact core costs milliseconds (R = 256: ~5 ms), less than the Krylov loop's fixed work
# (2 (q + 1) products, as many orthonormalisations and an eigenproblem, each a kernel launch or several), and
# the exact path batches a whole group: auto keeps it exact there whatever the model says.
MIN_RANDOMIZED_RANK = 256


def truncation_path(
    m: int, n: int, R: int, rank: int, truncation: str = "auto",
    oversample: int = DEFAULT_OVERSAMPLE, power_iterations: int = DEFAULT_POWER_ITERATIONS,
) -> str:
    """How svd truncates an (m x n) module whose stacked factors have rank R to `rank`: "gram" (exact, from the
    R x R Grams; combine falls back to QR of the stacks where they are ill-conditioned and records "qr"), "dense"
    (exact, the SVD of the dense update: R >= min(m, n)) or "randomized" (sketch.randomized_svd). See the cost
    model above; "exact" and "randomized" force the choice (randomized still goes exact where nothing is truncated,
    R <= rank)."""
    exact = "dense" if R >= min(m, n) else "gram"
    columns = (power_iterations + 1) * (rank + oversample)
    if truncation == "exact" or R <= rank:
        return exact
    if truncation == "randomized":
        return "randomized"
    if columns >= min(m, n) or R < MIN_RANDOMIZED_RANK:
        return exact
    randomized = 4.0 * (power_iterations + 1) * (m + n) * R * (rank + oversample)
    if exact == "gram":
        cost = 2.0 * (m + n) * R * R + CORE_FLOPS * R**3
    else:
        cost = 2.0 * m * n * R + CORE_FLOPS * m * n * min(m, n)
    return "randomized" if cost > RANDOMIZED_SAVING * randomized else exact


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
    gram: UpdateGram,
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
    update where R >= min(m, n), or with a block Krylov range finder (sketch.randomized_svd: `oversample` extra
    columns, `power_iterations` Krylov blocks after the first, test matrices seeded from `sketch_seed` and the
    module path) where the exact core would cost much more. `truncation` "exact" or "randomized" forces the choice.
    Whatever the path, the discarded norm is exact: on the randomized path ||dW - dW_r||^2 = ||dW||^2
    - 2 <dW, dW_r> + ||dW_r||^2 in float64, ||dW|| from `gram` (the Grams) and the rest from products with the
    rank-`rank` result (_discarded). ModuleReport.truncation records the path.
    """
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
    if in_core_space(rule, params):
        return _core(adapters, coefficients, rule, params, seed, method, rank, device, dtype)
    if rule not in LOW_RANK:
        if method != "svd":
            raise NanPeftError(f"the {rule} rule gives dense updates: combine them with svd and a rank, not {method}")
        return _dense(adapters, coefficients, rule, options, rank, device, dtype)
    scale = params.get("scale", 1.0)
    terms = {path: t for path, t in weighted_terms(adapters, coefficients, scale).items() if t}
    norms = lambda: dict(zip(gram.modules, (abs(scale) * gram.merged_norms(coefficients.values)).tolist()))  # noqa: E731
    if method == "cat":
        return _cat(terms, norms(), rank, dtype)
    sketch = {"truncation": truncation, "oversample": oversample, "power_iterations": power_iterations, "seed": sketch_seed}
    return _svd(terms, rank, device, dtype, max_batch_bytes, norms, sketch)


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


def _svd(terms, rank, device, dtype, max_batch_bytes, merged_norms, sketch):
    """Truncate every module's cat form to `rank`, a group of same-shaped modules at a time, by the path
    truncation_path picks for the group (merged_norms: a callable giving {path: exact merged norm}, from the Grams, for
    the randomized path). The exact path works from the Gram matrices of the stacked factors
    (gram.truncation_from_grams): two passes over the factors, converted to float64 a cache-sized piece at a
    time, no QR of the tall stacks, and the small R x R algebra batched over a whole group of same-shaped
    modules. Modules whose Grams are too ill-conditioned for that (rank-deficient stacks: the same adapter
    twice) are truncated by QR of their stacks (gram.truncate_low_rank)."""
    merged, report = {}, {}
    piece_bytes = min(chunk_bytes(device), max_batch_bytes)
    buffer = torch.empty(piece_bytes // 8, dtype=torch.float64, device=device)
    exact_norms = None
    for group in groups(terms):
        how = truncation_path(group.m, group.n, group.rank, rank, sketch["truncation"], sketch["oversample"], sketch["power_iterations"])
        if how != "gram":
            if how == "randomized" and exact_norms is None:
                exact_norms = merged_norms()
            outputs = _truncate_stacked(group, rank, dtype, device, max_batch_bytes, how, sketch, exact_norms, buffer)
            for g, (B_r, A_r, norm, discarded, kept) in enumerate(outputs):
                name = group.paths[g]
                merged[name] = _like(terms[name][0][1], A_r, B_r, name)
                report[name] = ModuleReport(name, group.rank, kept, norm, discarded, how)
            continue
        B, A, S = _truncate_group(group, rank, dtype, buffer)
        qr = set()
        for g in (~torch.isfinite(S).all(-1)).nonzero().flatten().tolist():  # marked ill-conditioned: QR
            path = group.paths[g]
            A_full, B_full = _stack([terms[path]], group.ranks, group.n, group.m, device, torch.float64)
            B_qr, A_qr, singular = (x[0] for x in truncate_low_rank(B_full, A_full, rank))
            B[g], A[g] = B_qr.to("cpu", dtype), A_qr.to("cpu", dtype)
            qr.add(g)
            S[g] = torch.nn.functional.pad(singular.cpu(), (0, S.shape[-1] - singular.shape[-1]))
        norms, discarded = S.square().sum(-1).sqrt().tolist(), tail_energy(S, rank).tolist()
        kept = (S[:, :rank] > 0).sum(-1).tolist()
        for g, path in enumerate(group.paths):
            merged[path] = _like(terms[path][0][1], A[g], B[g], path)
            report[path] = ModuleReport(path, group.rank, kept[g], norms[g], discarded[g], "qr" if g in qr else "gram")
    paths = sorted(merged)
    return {p: merged[p] for p in paths}, [report[p] for p in paths]


def _truncate_stacked(group: Group, rank: int, dtype: torch.dtype, device, max_batch_bytes: int, how: str, sketch: dict,
                      exact_norms: dict[str, float] | None, buffer: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, float, float, int]]:
    """Yield (B_r, A_r, norm, discarded, kept rank) for each module of the group in order, truncated by `how`:
    "dense" (the SVD of B @ A formed in float64) or "randomized" (sketch.randomized_svd on the factored stacks, in
    sketch_dtype(group); its discarded norm is computed exactly afterwards by _discarded, from exact_norms and
    float64 products of the factors with the result). The stacks of as many modules as max_batch_bytes holds (at
    least one) are built in buffers reused across the group (fresh memory costs page faults) and the truncation runs
    batched over them; `buffer` is the float64 piece buffer of batching.stacked_chunks."""
    G, R, m, n = len(group.paths), group.rank, group.m, group.n
    stack_dtype = torch.float64 if how == "dense" else sketch_dtype(group)
    size = torch.empty((), dtype=stack_dtype).element_size()
    per_module = R * (m + n) * size + (m * n * 8 if how == "dense" else 0)
    step = max(1, min(G, max_batch_bytes // per_module))
    A_buffer = torch.empty((step, R, n), dtype=stack_dtype, device=device)
    B_buffer = torch.empty((step, m, R), dtype=stack_dtype, device=device)
    for start in range(0, G, step):
        chunk = group.terms[start : start + step]
        count = len(chunk)
        A, B = _stack(chunk, group.ranks, n, m, device, stack_dtype, out=(A_buffer[:count], B_buffer[:count]))
        if how == "dense":
            B_r, A_r, S = truncate_dense(B @ A, rank)
            norm, discarded = S.square().sum(-1).sqrt(), tail_energy(S, rank)
        else:
            columns = min(rank + sketch["oversample"], m, n)
            apply, apply_t = factored(B, A)
            # the Krylov bases (orthogonalised against each other: the costly part after the products) on the
            # shorter side: M^T where m > n (gate_proj, up_proj), the transposed result turned back
            omega = seeded_gaussians(group.paths[start : start + count], max(m, n), columns, sketch["seed"], stack_dtype, device)
            if m > n:
                left, S, right = randomized_svd(apply_t, apply, omega, rank, sketch["power_iterations"])  # M^T = left S right
                L, Rt = canonical_signs(right.mT, left.mT)
            else:
                L, S, Rt = randomized_svd(apply, apply_t, omega, rank, sketch["power_iterations"])
            B_r, A_r = (x.to(torch.float64) for x in split_singular(L, S, Rt, rank))
            norm = torch.tensor([exact_norms[p] for p in group.paths[start : start + count]], dtype=torch.float64, device=device)
            discarded = _discarded(group, start, start + count, B_r, A_r, norm, buffer)
        kept = (S[..., :rank] > 0).sum(-1).tolist()
        B_r, A_r = B_r.to("cpu", dtype), A_r.to("cpu", dtype)
        norm, discarded = norm.cpu().tolist(), discarded.cpu().tolist()
        for g in range(count):
            yield B_r[g], A_r[g], norm[g], discarded[g], kept[g]


def sketch_dtype(group: Group) -> torch.dtype:
    """The precision of the randomized path's products: float64 where a factor is float64, else float32. The range
    finder needs no more precision than the factors carry (their own rounding is float32's or coarser), float32
    GEMMs run at twice float64's rate (measured here: 240 vs 116 GFLOP/s), and the discarded norm is recomputed
    exactly in float64 whatever the products' precision (_discarded)."""
    wide = any(t.dtype == torch.float64 for path_terms in group.terms for _, module, _ in path_terms for t in (module.A, module.B))
    return torch.float64 if wide else torch.float32


def _discarded(group: Group, start: int, stop: int, B_r: torch.Tensor, A_r: torch.Tensor, norm: torch.Tensor,
               buffer: torch.Tensor) -> torch.Tensor:
    """||dW - B_r A_r||_F for modules group.paths[start:stop], exactly (float64) and without dW: with dW = B A
    (B = [w_1 B_1 | ...]), ||dW - B_r A_r||^2 = ||dW||^2 - 2 <B A, B_r A_r> + ||B_r A_r||^2, where
    <B A, B_r A_r> = sum(diag(w) (B^T B_r) * (A A_r^T)) and ||B_r A_r||^2 = sum((B_r^T B_r) * (A_r A_r^T)) need
    products with k = rank columns only (one pass over the factors, converted to float64 in `buffer`), and ||dW||
    (`norm`) comes from the Grams. Exact for the factors returned, however they were found; rounding error about
    2.2e-16 ||dW||^2 in the square."""
    k = B_r.shape[-1]
    G, R = stop - start, group.rank
    BtBr = buffer.new_zeros((G, R, k))
    AAr = buffer.new_zeros((G, R, k))
    for rows, piece in stacked_chunks(group, "B", buffer, start, stop):
        BtBr.baddbmm_(piece.mT, B_r[:, rows])
    for columns, piece in stacked_chunks(group, "A", buffer, start, stop):
        AAr.baddbmm_(piece, A_r[..., columns].mT)
    weights = group.weights(device=buffer.device)[start:stop]
    cross = (weights.unsqueeze(-1) * BtBr * AAr).sum((-2, -1))
    kept = ((B_r.mT @ B_r) * (A_r @ A_r.mT)).sum((-2, -1))
    return (norm.square() - 2 * cross + kept).clamp_min(0).sqrt()


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
    for m, path in enumerate(coefficients.modules):
        c = coefficients.values[m]
        members = [k for k, a in enumerate(adapters) if path in a.modules and c[k] != 0]
        if not members:
            continue
        modules = [adapters[k].modules[path] for k in members]
        deltas = torch.stack([mod.scale * (mod.B.to(device, dtype) @ mod.A.to(device, dtype)) for mod in modules])
        generator = module_generator(seed, path) if seed is not None else None
        yield path, modules, RULES[rule](deltas, c[members].to(device), generator, **params)


def _core(adapters, coefficients, rule, params, seed, method, rank, device, dtype):
    """The spectral rules (and task_arithmetic with calibrate) in each module's core space (core_space.core_merges):
    exact (cat: rank R, the largest sum of the ranks, or `rank` above it, zero-padded) or the optimal truncation
    to `rank` (svd), its discarded norm from the merged update's singular values."""
    if method == "cat" and rank is not None:
        needed = max((sum(a.modules[p].rank for a in adapters if p in a.modules) for p in coefficients.modules), default=0)
        if rank < needed:
            raise NanPeftError(f"cat is exact and needs rank >= {needed} (the sum of the ranks); use svd to truncate to {rank}")
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
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        dtype = str(B.dtype).removeprefix("torch.")
        fix = "merge with dtype=float32 (--dtype float32)" if B.element_size() < 4 else "check the adapters' scales and the merge's options"
        raise NanPeftError(f"the merged factors of {path} overflow {dtype}; {fix}")
    return LoraModule(A.contiguous(), B.contiguous(), 1.0, template.kind, template.a_tail, template.b_tail, template.fan_in_fan_out)
