"""How svd truncates the stacked factors of same-shaped modules to a rank: exactly from the R x R Grams (QR of the
stacks where those are ill-conditioned), exactly by the SVD of the dense update where R reaches min(m, n), or by a
block Krylov range finder (sketch.py) where the exact core would cost much more, run from the same Grams where R is
small next to m + n (krylov_from_grams) and on the factored stacks beyond; the choice by a cost model
(truncation_path), the discarded norm always exact. The Grams it sums can serve the caller too (on_grams: the
merge's inner products, norms.InnerProducts), so that a merge sums them once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch

from .batching import Group, groups, modules_per_piece, stack_terms, stacked_chunks
from .gram import canonical_signs, inner_products_from_grams, split_singular, tail_energy, truncate_dense, truncate_low_rank, truncation_from_grams
from .norms import gram_buffer, grams_by_piece
from .sketch import factored, randomized_from_grams, randomized_svd, seeded_gaussians

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
# krylov_from_grams: the randomized path runs from the Grams up to R = this share of m + n. Measured here on a 7B
# layer of 64 adapters (R = 1024: 0.125 and 0.068 of m + n): from Grams of its own 1.36 s against 1.32 s on the
# factors; in a merge's one pass, which sums the Grams for the inner products anyway, 1.50 s for the whole merge
# against 2.41 s in two passes. At R = 4096 (256 adapters: 0.5 and 0.27 of m + n) the Grams alone cost 3.2x the
# factored range finder, and the Krylov work on them grows with R^2.
GRAM_KRYLOV_SHARE = 0.25


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


def truncate_groups(terms, rank, device, dtype, max_batch_bytes, merged_norms, sketch, on_grams=None) -> dict[str, Truncated]:
    """Truncate every module's cat form to `rank`, a group of same-shaped modules at a time, by the path
    truncation_path picks for the group (merged_norms: a callable giving {path: exact merged norm}, from the Grams, for
    the randomized path on the factors). The exact path works from the Gram matrices of the stacked factors
    (gram.truncation_from_grams): two passes over the factors, converted to float64 a piece at a time (pieces as
    update_gram's, norms.gram_buffer), no QR of the tall stacks, and the small R x R algebra batched over a whole group
    of same-shaped modules. The randomized path runs from the same Grams (sketch.randomized_from_grams) where
    krylov_from_grams says so, else on the factored stacks (_truncate_stacked). Modules whose Grams are too
    ill-conditioned for that (rank-deficient stacks: the same adapter twice) are truncated by QR of their stacks
    (gram.truncate_low_rank). on_grams(group, start, stop, AAt, BtB), where given, receives every module's unweighted
    factor Grams (norms.factor_grams), summed once for the truncation and the caller (norms.InnerProducts); groups
    whose path needs none have them summed for it, and their exact norms then come from them, not merged_norms."""
    truncated = {}
    found = groups(terms)
    buffer = gram_buffer(found, device, max_batch_bytes)
    exact_norms = None
    for group in found:
        how = truncation_path(group.m, group.n, group.rank, rank, sketch["truncation"], sketch["oversample"], sketch["power_iterations"])
        if how == "dense" or (how == "randomized" and not krylov_from_grams(group.m, group.n, group.rank, rank, sketch)):
            if on_grams is not None:
                exact_norms = _grams_for(group, buffer, on_grams)
            elif how == "randomized" and exact_norms is None:
                exact_norms = merged_norms()
            outputs = _truncate_stacked(group, rank, dtype, device, max_batch_bytes, how, sketch, exact_norms, buffer)
            for g, (B_r, A_r, norm, discarded, kept) in enumerate(outputs):
                truncated[group.paths[g]] = Truncated(B_r, A_r, group.rank, kept, norm, discarded, how)
            continue
        B, A, norms, discarded, kept, ok = _truncate_group(group, rank, dtype, buffer, max_batch_bytes, sketch if how == "randomized" else None, on_grams)
        for g, path in enumerate(group.paths):
            if ok[g]:
                truncated[path] = Truncated(B[g], A[g], group.rank, kept[g], norms[g], discarded[g], how)
                continue
            A_full, B_full = stack_terms([terms[path]], group.ranks, group.n, group.m, device, torch.float64)  # ill-conditioned: QR
            B_qr, A_qr, singular = (x[0] for x in truncate_low_rank(B_full, A_full, rank))
            norm, tail = float(singular.square().sum().sqrt()), float(tail_energy(singular, rank))
            truncated[path] = Truncated(B_qr.to("cpu", dtype), A_qr.to("cpu", dtype), group.rank, int((singular[:rank] > 0).sum()), norm, tail, "qr")
    return truncated


def _grams_for(group: Group, buffer: torch.Tensor, on_grams) -> dict[str, float]:
    """Sum the group's factor Grams piece by piece for on_grams; return each module's exact merged norm from them,
    ||sum_k w_k B_k A_k||_F^2 = sum_kl w_k w_l <B_k A_k, B_l A_l> (the group's term weights; the K x K inner products
    of the unweighted factors from the Grams, gram.inner_products_from_grams: one R x R temporary, not three)."""
    norms = {}
    for start, stop, AAt, BtB in grams_by_piece(group, buffer):
        on_grams(group, start, stop, AAt, BtB)
        w = torch.tensor([[weight for _, _, weight in path_terms] for path_terms in group.terms[start:stop]],
                         dtype=torch.float64, device=buffer.device)
        squared = torch.einsum("gk,gkl,gl->g", w, inner_products_from_grams(AAt, BtB, group.ranks), w)
        norms.update(zip(group.paths[start:stop], squared.clamp_min(0).sqrt().tolist()))
    return norms


def krylov_from_grams(m: int, n: int, R: int, rank: int, sketch: dict) -> bool:
    """Whether a randomized truncation of an (m x n) module with stacks of rank R runs from the R x R Grams
    (sketch.randomized_from_grams: the Grams, 2 (m + n) R^2 flops, then O(q R^2 l) work) rather than on the factored
    stacks (sketch.randomized_svd: 4 (q + 1) (m + n) R l flops of products plus orthogonalisations of m- or n-long
    blocks): where its Krylov space leaves room in R (fewer columns than R rows) and R is at most GRAM_KRYLOV_SHARE of
    m + n (see there)."""
    columns = (sketch["power_iterations"] + 1) * (rank + sketch["oversample"])
    return columns < R < min(m, n) and R <= GRAM_KRYLOV_SHARE * (m + n)


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


def _truncate_group(group: Group, rank: int, dtype: torch.dtype, buffer: torch.Tensor, max_batch_bytes: int,
                    sketch: dict | None = None, on_grams=None):
    """(B_r (G, m, rank), A_r (G, rank, n)) in `dtype` on the CPU, with each module's norm, discarded norm, kept rank
    and whether it could be used (lists of G): exactly by truncation_from_grams, or with `sketch` by
    randomized_from_grams (its norm and discarded norm from the Grams, _discarded_from_grams); where not usable
    (ill-conditioned) the caller uses QR.

    A batch of modules at a time (as many as ALGEBRA_COPIES R x R matrices of each fit in max_batch_bytes: the whole
    group where R is small, one or two modules at R = 1024): pass 1 sums their Grams piece by piece; the R x R algebra
    runs once for the batch; pass 2 forms B_r = B Pb piece by piece and picks canonical signs (gram.canonical_signs:
    the largest entry of each column of B_r positive) as it goes; pass 3 forms A_r = Pa A with those signs."""
    G, R, m, n = len(group.paths), group.rank, group.m, group.n
    step = modules_per_piece(group, buffer.element_size(), buffer.numel() * buffer.element_size())
    batch = max(1, max_batch_bytes // (ALGEBRA_COPIES * 8 * R * R) // step) * step
    B = A = None
    weights = group.weights(device=buffer.device)  # B = [w_1 B_1 | ...]: scale B^T B, then Pb's rows
    results = []
    for first in range(0, G, batch):
        last = min(G, first + batch)
        grams = list(grams_by_piece(group, buffer, first, last))
        if on_grams is not None:
            for piece in grams:
                on_grams(group, *piece)
        AAt, BtB = torch.cat([AAt for _, _, AAt, _ in grams]), torch.cat([BtB for _, _, _, BtB in grams])
        del grams
        w = weights[first:last]
        if sketch is None:
            Pb, Pa, S, ok = truncation_from_grams(AAt, BtB * w.unsqueeze(-1) * w.unsqueeze(-2), rank)
            Pb = Pb * w.unsqueeze(-1)
            norms, discarded = S.square().sum(-1).sqrt(), tail_energy(S, rank)
        else:
            omega = seeded_gaussians(group.paths[first:last], R, min(rank + sketch["oversample"], R), sketch["seed"], torch.float64, buffer.device)
            Pb, S, Pa, ok = randomized_from_grams(AAt, BtB, w, omega, rank, sketch["power_iterations"])
            norms, discarded = _discarded_from_grams(AAt, BtB, w, Pb, Pa)
        del AAt, BtB
        if B is None:  # k = min(rank, the columns found) is the same for every batch
            allocate = torch.zeros if Pb.shape[-1] < rank else torch.empty
            B, A = allocate((G, m, rank), dtype=dtype), allocate((G, rank, n), dtype=dtype)
        _factors(group, first, last, step, Pb, Pa, buffer, B, A)
        results.append((norms, discarded, (S[:, :rank] > 0).sum(-1), ok))
    norms, discarded, kept, ok = (torch.cat(parts).tolist() for parts in zip(*results))
    return B, A, norms, discarded, kept, ok


# _truncate_group runs the R x R algebra of as many modules at once as hold this many R x R float64 matrices each
# (the Grams, their scaled and weighted copies, Cholesky factors and inverses, the core and its SVD) in max_batch_bytes.
ALGEBRA_COPIES = 16


def _factors(group: Group, first: int, last: int, step: int, Pb: torch.Tensor, Pa: torch.Tensor, buffer: torch.Tensor,
             B: torch.Tensor, A: torch.Tensor) -> None:
    """B[first:last] = B_r = B Pb and A[first:last] = A_r = Pa A for modules group.paths[first:last], the stacks read
    piece by piece (pass 2, which also picks canonical signs: the largest entry of each column of B_r positive, and
    pass 3, with those signs)."""
    k = Pb.shape[-1]
    largest = buffer.new_full((last - first, k), -1.0)
    sign = buffer.new_ones((last - first, k))
    for start in range(first, last, step):
        stop, rows_of = min(last, start + step), slice(start - first, min(last, start + step) - first)
        for rows, piece in stacked_chunks(group, "B", buffer, start, stop):
            product = torch.bmm(piece, Pb[rows_of])
            size, where = product.abs().max(dim=-2)
            better = size > largest[rows_of]
            largest[rows_of] = torch.where(better, size, largest[rows_of])
            found = torch.gather(product, -2, where.unsqueeze(-2)).squeeze(-2)
            sign[rows_of] = torch.where(better, torch.where(found < 0, -1.0, 1.0), sign[rows_of])
            B[start:stop, rows, :k] = product
    B[first:last, :, :k] *= sign.unsqueeze(-2).to("cpu", B.dtype)
    Pa = Pa * sign.unsqueeze(-1)
    for start in range(first, last, step):
        stop = min(last, start + step)
        for columns, piece in stacked_chunks(group, "A", buffer, start, stop):
            A[start:stop, :k, columns] = torch.bmm(Pa[start - first : stop - first], piece)


def _discarded_from_grams(AAt: torch.Tensor, BtB: torch.Tensor, weights: torch.Tensor, Pb: torch.Tensor, Pa: torch.Tensor):
    """(||dW||_F, ||dW - dW_r||_F) per module, dW = B diag(w) A and dW_r = (B Pb)(Pa A), from the Grams AAt = A A^T,
    BtB = B^T B (float64) alone: ||dW||^2 = sum((W BtB W) * AAt), <dW, dW_r> = tr(W BtB Pb Pa AAt) =
    sum((W BtB Pb) * (AAt Pa^T)), ||dW_r||^2 = sum((Pb^T BtB Pb) * (Pa AAt Pa^T)). Exact for the factors returned,
    rounding error about 2.2e-16 ||dW||^2 in the square, as _discarded's."""
    w = weights.to(AAt.dtype)
    squared = (BtB * (w.unsqueeze(-1) * w.unsqueeze(-2)) * AAt).sum((-2, -1))
    BPb, APa = BtB @ Pb, AAt @ Pa.mT
    cross = ((w.unsqueeze(-1) * BPb) * APa).sum((-2, -1))
    kept = ((Pb.mT @ BPb) * (Pa @ APa)).sum((-2, -1))
    return squared.clamp_min(0).sqrt(), (squared - 2 * cross + kept).clamp_min(0).sqrt()
