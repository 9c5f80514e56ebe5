"""The core space of one module's LoRA updates: where spectral merge rules run without the dense update.

For the K updates dW_k = s_k B_k A_k of a module (m x n, ranks r_k, R = sum_k r_k), every dW_k maps the row
space of the stacked A = [A_1; ...; A_K] (R x n) into the column space of the stacked B = [s_1 B_1 | ... |
s_K B_K] (m x R). With orthonormal bases U (m x p) of the latter and V (n x q) of the former (p = min(m, R),
q = min(n, R)), dW_k = U N_k V^T exactly, with the core N_k = U^T dW_k V (p x q): R x R where R <= m, n.

The bases come from thin QR, B = Qb Rb and A^T = Qa Ra, then the SVD of the weighted sum's small factor,
Rb diag(c) Ra^T = u S v^T (full u, v: the bases keep every direction of every update): U = Qb u and V = Qa v are
the singular bases of the coefficient-weighted sum sum_k c_k dW_k, not arbitrary QR bases, and the cores are
N_k = u^T Rb_k Ra_k^T v from the R factors' blocks alone. Rules that act on the right side entry by entry in
the update's own n coordinates (KnOTS) take the left-reduced updates L_k = U^T dW_k = u^T Rb_k A_k (p x n).

A rule's result G (p x q in the core, or p x n left-reduced) is an update U G V^T (or U G); its thin SVD
G = x S y^T gives the merged factors B' = U x S^1/2, A' = S^1/2 y^T V^T at exact rank, or their optimal
rank-r truncation (Eckart-Young: U and V are orthonormal) with the discarded norm from S. Nothing of size m x n
is formed: the work is two thin QRs, O((m + n) R^2), and R x R algebra.

core_merges runs same-shaped modules together (as the svd merge does, truncation.py): their stacks, the Grams
A A^T and B^T B of the whole batch in a few batched products, and Rb, Ra from Jacobi-scaled Cholesky factors of the
Grams (Cholesky QR: B = Qb Rb with Qb = B Rb^-1 never formed; B' = B (Rb^-1 u x S^1/2), A' = (S^1/2 y^T v^T Ra^-T) A),
so that no module pays for two Householder QRs of its tall stacks (a LAPACK QR of a 4096 x 48 stack costs more
than all of its module's R x R algebra). Where a scaled Gram's condition bound exceeds CORE_CONDITION (rank-
deficient stacks: R above a side, the same adapter twice) that module takes the QR path (core_space).

Every function is pure and device-agnostic; pass float64 for float64 accumulation.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .batching import stack_terms
from .coefficients import contributions
from .errors import NanPeftError
from .gram import canonical_signs, column_signs, scaled_cholesky, wide_svd_parts
from .rules import RIGHT_DENSE, RULES, check_truncation, module_generator
from .rules.knots import Factored

# core_merges trusts the Cholesky factors of the Jacobi-scaled Grams up to this condition bound: the implied bases
# Qb = B Rb^-1, Qa are then orthonormal to about 1e4 * 2.2e-16, far inside the 1e-9 the rules are tested to (the
# QR path's own rounding is ~1e-15); stacks beyond it take the QR path.
CORE_CONDITION = 1e4
# One batch of modules' float64 stacks (core_merges): the Grams and factorisations of a few dozen 7B-sized modules at
# once, while the results waiting to be yielded in module order stay small.
CORE_BATCH_BYTES = 64 * 2**20


@dataclass(frozen=True)
class CoreSpace:
    """One module's core space: Qb (m, p), Qa (n, q) and the rotations u (p, p), v (q, q) with U = Qb u and V = Qa v
    (kept apart so that U and V are never formed: products go through the thin factors), and the updates' cores."""

    Qb: torch.Tensor
    Qa: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    cores: torch.Tensor
    """(K, p, q): N_k = U^T dW_k V."""
    left: torch.Tensor | None = None
    """(K, p, n): L_k = U^T dW_k, when asked for (right_dense)."""

    @property
    def U(self) -> torch.Tensor:
        return self.Qb @ self.u

    @property
    def V(self) -> torch.Tensor:
        return self.Qa @ self.v


def blocks(ranks: Sequence[int]) -> list[slice]:
    """The slice of each update's rows in the stacked A (columns in the stacked B)."""
    edges = [0]
    for r in ranks:
        edges.append(edges[-1] + r)
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


def core_space(B: torch.Tensor, A: torch.Tensor, ranks: Sequence[int], weights: torch.Tensor, right_dense: bool = False) -> CoreSpace:
    """The core space of the updates B_k A_k given stacked B = [B_1 | ... | B_K] (m, R) and A = [A_1; ...; A_K]
    (R, n) (each update's scale already in its B block), with the SVD bases of sum_k weights_k B_k A_k."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    parts = blocks(ranks)
    repeated = torch.cat([w.expand(s.stop - s.start) for w, s in zip(weights.to(B.dtype), parts)])
    u, _, vh = torch.linalg.svd((Rb * repeated) @ Ra.mT, full_matrices=True)
    v = vh.mT
    cores = torch.stack([u.mT @ Rb[:, s] @ (Ra[:, s].mT @ v) for s in parts])
    left = torch.stack([u.mT @ Rb[:, s] @ A[s] for s in parts]) if right_dense else None
    return CoreSpace(Qb, Qa, u, v, cores, left)


def merged_factors(space: CoreSpace, merged: torch.Tensor, rank: int, left_reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B' (m, rank), A' (rank, n), S): the factors of the update U G V^T (G = `merged`, p x q) or, left_reduced,
    U G (G p x n), truncated optimally to `rank` or zero-padded up to it, the singular values split evenly between
    them; S holds all singular values of the update (its norm and the discarded tail come from them)."""
    x, S, yh = torch.linalg.svd(merged, full_matrices=False)
    k = min(rank, S.shape[-1])
    root = S[:k].sqrt()
    left = space.u @ (x[:, :k] * root)
    right = root.unsqueeze(-1) * yh[:k]
    if not left_reduced:  # a core: back to n coordinates through V = Qa v
        right = (right @ space.v.mT) @ space.Qa.mT
    B_r, A_r = canonical_signs(space.Qb @ left, right)
    if k < rank:
        B_r = torch.nn.functional.pad(B_r, (0, rank - k))
        A_r = torch.nn.functional.pad(A_r, (0, 0, 0, rank - k))
    return B_r, A_r, S


def core_merges(adapters, coefficients, rule: str, params: dict, seed: int | None, rank: int | None = None,
                device: torch.device | str = "cpu", max_batch_bytes: int = CORE_BATCH_BYTES
                ) -> Iterator[tuple[str, list, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (path, contributing modules, B' (m, k), A' (k, n), S) for every module with a non-zero coefficient:
    the module's updates s_k B_k A_k, stacked in float64 on `device`, merged by RULES[rule] in their core space
    with the coefficients c_k as its weights, k = `rank` (truncated or zero-padded) or, for None, R = the sum of
    the ranks (exact). S: all singular values of the merged update. Yielded in module order; the next modules of the
    same shape and ranks are stacked and merged together (at most max_batch_bytes of float64 stacks), so that only
    one batch's results per shape wait to be yielded."""
    check_truncation(rule, None if rank is None else "svd")
    for path, modules, merged in _in_batches(adapters, coefficients, max_batch_bytes,
                                             lambda items: _merge_batch(items, rule, params, seed, rank, device)):
        yield (path, modules, *merged)


def core_norms(adapters, coefficients, rule: str, params: dict, seed: int | None, device: torch.device | str = "cpu",
               max_batch_bytes: int = CORE_BATCH_BYTES) -> Iterator[tuple[str, list, float]]:
    """Yield (path, contributing modules, ||M||_F) for core_merges' merged update M of every module, without its
    factors: the rule's result G in the core space has the update's norm (||U G V^T||_F = ||G||_F, U and V
    orthonormal), so G's SVD and the output products are skipped. What --scale auto measures (nan_peft.scale)."""
    yield from _in_batches(adapters, coefficients, max_batch_bytes,
                           lambda items: _merge_batch(items, rule, params, seed, None, device, measure=True))


def _in_batches(adapters, coefficients, max_batch_bytes: int, work) -> Iterator[tuple[str, list, object]]:
    """(path, modules, work's result for the module) in module order, `work` run on batches of same-shaped modules."""
    found = list(contributions(adapters, coefficients))
    keys = [(tuple(mod.rank for mod in modules), modules[0].B.shape[0], modules[0].A.shape[1]) for _, modules, _ in found]
    members: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    taken = dict.fromkeys(members, 0)
    done: dict[int, object] = {}
    for i, (path, modules, _) in enumerate(found):
        if i not in done:  # the first of a new batch: it and the next modules of its shape
            (ranks, m, n), first = keys[i], taken[keys[i]]
            batch = members[keys[i]][first : first + max(1, max_batch_bytes // (8 * sum(ranks) * (m + n)))]
            taken[keys[i]] = first + len(batch)
            done.update(zip(batch, work([found[j] for j in batch])))
        yield path, modules, done.pop(i)


def _merge_batch(items: list, rule: str, params: dict, seed: int | None, rank: int | None, device, measure: bool = False) -> list:
    """[(B', A', S)] for same-shaped modules items = [(path, modules, c)]: the Grams of their float64 stacks, the
    scaled Cholesky factors, the SVD bases, cores, the merged factors' SVD and the output products batched over the
    modules; each module's rule on its own cores. A module whose Grams are too ill-conditioned takes core_space (QR).
    measure: [||G||_F] of the rule's results G instead, before their SVD (core_norms)."""
    right_dense = rule in RIGHT_DENSE
    ranks = [mod.rank for mod in items[0][1]]
    width = sum(ranks) if rank is None else rank
    m, n = items[0][1][0].B.shape[0], items[0][1][0].A.shape[1]
    terms = [[(0, mod, mod.scale) for mod in modules] for _, modules, _ in items]
    A, B = stack_terms(terms, ranks, n, m, device, torch.float64)  # B = [s_1 B_1 | ...]
    AAt = A @ A.mT
    La, ok_a, scale_a, inverse_a = scaled_cholesky(AAt, CORE_CONDITION)
    Lb, ok_b, scale_b, inverse_b = scaled_cholesky(B.mT @ B, CORE_CONDITION)
    parts = blocks(ranks)
    weights = torch.stack([c.to(device, torch.float64) for _, _, c in items])  # (G, K)
    out: list = [None] * len(items)
    for g in (~(ok_a & ok_b)).nonzero().flatten().tolist():  # QR, module by module
        space = core_space(B[g], A[g], ranks, weights[g], right_dense)
        merged = _rule(rule, space.left if right_dense else space.cores, weights[g], seed, items[g][0], params)
        out[g] = float(torch.linalg.matrix_norm(merged)) if measure else merged_factors(space, merged, width, right_dense)
    good = (ok_a & ok_b).nonzero().flatten()
    if good.numel() == 0:
        return out
    pick = good if good.numel() < len(items) else slice(None)  # a view, not a copy of the stacks, where all are good
    A, B, weights, AAt = A[pick], B[pick], weights[pick], AAt[pick]
    # A A^T = Ra^T Ra and B^T B = Rb^T Rb with Ra = (D_a^-1 La)^T, D = diag(scale): the R factors of A^T and B's QR
    # (up to the signs of their rows); their inverses D L^-T from the inverses the condition bounds computed
    Ra, Rb = (La[pick] / scale_a[pick]).mT, (Lb[pick] / scale_b[pick]).mT
    Ra_inverse, Rb_inverse = scale_a[pick] * inverse_a[pick].mT, scale_b[pick] * inverse_b[pick].mT
    repeated = weights.repeat_interleave(torch.tensor(ranks, device=weights.device), dim=1)  # (G, R): c_k per column
    u, _, vh = torch.linalg.svd((Rb * repeated.unsqueeze(-2)) @ Ra.mT, full_matrices=True)
    v = vh.mT
    left_b = u.mT @ Rb  # its columns of block k: U^T (s_k B_k) = u^T Rb_k
    if right_dense:  # the left-reduced updates U^T dW_k = (u^T Rb_k) A_k, as their factors
        updates = [Factored(left_b[g], A[g], parts, AAt[g]) for g in range(len(good))]
    else:  # the cores U^T dW_k V = (u^T Rb_k)(Ra_k^T v)
        right_a = Ra.mT @ v
        updates = [torch.stack([left_b[g][:, s] @ right_a[g][s] for s in parts]) for g in range(len(good))]
    merged = torch.stack([_rule(rule, updates[g], weights[g], seed, items[int(index)][0], params) for g, index in enumerate(good)])
    if measure:
        for index, norm in zip(good.tolist(), torch.linalg.matrix_norm(merged).tolist()):
            out[index] = norm
        return out
    x, S, vh, Q = wide_svd_parts(merged)  # R x n left-reduced: Cholesky QR, then the R x R SVD (Q None: LAPACK)
    k = min(width, S.shape[-1])
    root = S[..., :k].sqrt()
    B_r = B @ (Rb_inverse @ (u @ (x[..., :k] * root.unsqueeze(-2))))  # U x S^1/2 = Qb u x S^1/2, Qb = B Rb^-1
    sign = column_signs(B_r)  # canonical signs, flipped in B_r in place and folded into the small side of A_r
    B_r.mul_(sign)
    right = (sign.mT * root.unsqueeze(-1)) * vh[..., :k, :]  # S^1/2 y^T with the signs: n coordinates (left-reduced) or V's
    if Q is not None:
        right = right @ Q
    A_r = right if right_dense else ((right @ v.mT) @ Ra_inverse.mT) @ A  # S^1/2 y^T v^T Qa^T, Qa^T = Ra^-T A
    if k < width:
        B_r, A_r = torch.nn.functional.pad(B_r, (0, width - k)), torch.nn.functional.pad(A_r, (0, 0, 0, width - k))
    for g, index in enumerate(good.tolist()):
        out[index] = (B_r[g], A_r[g], S[g])
    return out


def _rule(rule: str, updates: torch.Tensor, weights: torch.Tensor, seed: int | None, path: str, params: dict) -> torch.Tensor:
    """RULES[rule] on one module's cores (or left-reduced updates), its errors named by the module."""
    generator = module_generator(seed, path) if seed is not None else None
    try:
        return RULES[rule](updates, weights, generator, **params)
    except NanPeftError as error:
        raise NanPeftError(f"{path}: {error}") from None
