"""How svd truncates the stacked factors of same-shaped modules to a rank: exactly from the R x R Grams (QR of the
stacks where those are ill-conditioned), exactly by the SVD of the dense update where R reaches min(m, n), or by a
block Krylov range finder (sketch.py) where the exact core would cost much more; the choice by a cost model
(truncation_path), the discarded norm always exact."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .batching import Group, groups, modules_per_piece, stack_terms, stacked_chunks
from .gram import canonical_signs, split_singular, tail_energy, truncate_dense, truncate_low_rank, truncation_from_grams
from .norms import factor_grams, gram_buffer
from .sketch import factored, randomized_svd, seeded_gaussians

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


class Truncated(NamedTuple):
    """One module truncated: its factors (B_r m x rank, A_r rank x n, in the dtype asked for, on the CPU), the rank
    of its stacks, the rank kept, the exact merged update's norm, the norm discarded, and the path taken."""

    B: torch.Tensor
    A: torch.Tensor
    input_rank: int
    kept: int
    norm: float
    discarded: float
    path: str


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


def truncate_groups(terms, rank, device, dtype, max_batch_bytes, merged_norms, sketch) -> dict[str, Truncated]:
    """Truncate every module's cat form to `rank`, a group of same-shaped modules at a time, by the path
    truncation_path picks for the group (merged_norms: a callable giving {path: exact merged norm}, from the Grams, for
    the randomized path). The exact path works from the Gram matrices of the stacked factors
    (gram.truncation_from_grams): two passes over the factors, converted to float64 a piece at a time (pieces as
    update_gram's, norms.gram_buffer), no QR of the tall stacks, and the small R x R algebra batched over a whole group
    of same-shaped modules. Modules whose Grams are too ill-conditioned for that (rank-deficient stacks: the same adapter
    twice) are truncated by QR of their stacks (gram.truncate_low_rank)."""
    truncated = {}
    found = groups(terms)
    buffer = gram_buffer(found, device, max_batch_bytes)
    exact_norms = None
    for group in found:
        how = truncation_path(group.m, group.n, group.rank, rank, sketch["truncation"], sketch["oversample"], sketch["power_iterations"])
        if how != "gram":
            if how == "randomized" and exact_norms is None:
                exact_norms = merged_norms()
            outputs = _truncate_stacked(group, rank, dtype, device, max_batch_bytes, how, sketch, exact_norms, buffer)
            for g, (B_r, A_r, norm, discarded, kept) in enumerate(outputs):
                truncated[group.paths[g]] = Truncated(B_r, A_r, group.rank, kept, norm, discarded, how)
            continue
        B, A, S = _truncate_group(group, rank, dtype, buffer)
        qr = set()
        for g in (~torch.isfinite(S).all(-1)).nonzero().flatten().tolist():  # marked ill-conditioned: QR
            path = group.paths[g]
            A_full, B_full = stack_terms([terms[path]], group.ranks, group.n, group.m, device, torch.float64)
            B_qr, A_qr, singular = (x[0] for x in truncate_low_rank(B_full, A_full, rank))
            B[g], A[g] = B_qr.to("cpu", dtype), A_qr.to("cpu", dtype)
            qr.add(g)
            S[g] = torch.nn.functional.pad(singular.cpu(), (0, S.shape[-1] - singular.shape[-1]))
        norms, discarded = S.square().sum(-1).sqrt().tolist(), tail_energy(S, rank).tolist()
        kept = (S[:, :rank] > 0).sum(-1).tolist()
        for g, path in enumerate(group.paths):
            truncated[path] = Truncated(B[g], A[g], group.rank, kept[g], norms[g], discarded[g], "qr" if g in qr else "gram")
    return truncated


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
        A, B = stack_terms(chunk, group.ranks, n, m, device, stack_dtype, out=(A_buffer[:count], B_buffer[:count]), weighted=how == "dense")
        if how == "dense":
            B_r, A_r, S = truncate_dense(B @ A, rank)
            norm, discarded = S.square().sum(-1).sqrt(), tail_energy(S, rank)
        else:
            columns = min(rank + sketch["oversample"], m, n)
            weights = group.weights(device=device)[start : start + count]  # the stacks hold the factors' own values
            apply, apply_t = factored(B, A, weights)
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
            discarded = _discarded(B, A, weights, B_r, A_r, norm, buffer)
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


def _discarded(B: torch.Tensor, A: torch.Tensor, weights: torch.Tensor, B_r: torch.Tensor, A_r: torch.Tensor, norm: torch.Tensor,
               buffer: torch.Tensor) -> torch.Tensor:
    """||dW - B_r A_r||_F for the modules of the stacks B (G, m, R) and A (G, R, n) (the factors' own values, any
    float dtype), dW = B diag(weights) A, exactly (float64) and without dW: ||dW - B_r A_r||^2 = ||dW||^2
    - 2 <dW, B_r A_r> + ||B_r A_r||^2, where <dW, B_r A_r> = sum(diag(w) (B^T B_r) * (A A_r^T)) and
    ||B_r A_r||^2 = sum((B_r^T B_r) * (A_r A_r^T)) need products with k = rank columns only (one pass over the stacks,
    converted to float64 a cache-sized piece at a time in `buffer`: the conversion is exact), and ||dW|| (`norm`)
    comes from the Grams. Exact for the factors returned, however they were found; rounding error about
    2.2e-16 ||dW||^2 in the square."""
    G, R, k = B.shape[0], B.shape[-1], B_r.shape[-1]
    BtBr = buffer.new_zeros((G, R, k))
    AAr = buffer.new_zeros((G, R, k))
    for rows, piece in _float64_pieces(B, -2, buffer):
        BtBr.baddbmm_(piece.mT, B_r[:, rows])
    for columns, piece in _float64_pieces(A, -1, buffer):
        AAr.baddbmm_(piece, A_r[..., columns].mT)
    cross = (weights.to(torch.float64).unsqueeze(-1) * BtBr * AAr).sum((-2, -1))
    kept = ((B_r.mT @ B_r) * (A_r @ A_r.mT)).sum((-2, -1))
    return (norm.square() - 2 * cross + kept).clamp_min(0).sqrt()


def _float64_pieces(stack: torch.Tensor, dim: int, buffer: torch.Tensor):
    """Yield (s, stack[..., s, :] or stack[..., s] in float64): slices of `stack` along `dim` (-2 or -1), each
    converted into `buffer` (reused: consume a piece before asking for the next), or the stack's own slices where it
    is float64 already."""
    if stack.dtype == torch.float64:
        yield slice(None), stack
        return
    length = stack.shape[dim]
    across = stack.numel() // length
    if buffer.numel() < across:  # a tiny max_batch_bytes: one slice at a time in a buffer of its own
        buffer = buffer.new_empty(across)
    step = max(1, min(length, buffer.numel() // across))
    for begin in range(0, length, step):
        part = stack[..., begin : begin + step, :] if dim == -2 else stack[..., begin : begin + step]
        yield slice(begin, begin + step), buffer[: part.numel()].view(part.shape).copy_(part)


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
