"""Linear algebra on LoRA factors that never forms a dense (out x in) update (but for truncate_dense).

Every function is pure, batched over leading dimensions and device-agnostic. Callers pass float64 when
they want float64 accumulation. Factors are stacked along the rank axis: for updates dW_k = B_k A_k,
A = [A_1; ...; A_K] is (..., R, n) and B = [B_1 | ... | B_K] is (..., m, R), R = r_1 + ... + r_K, so that
sum_k B_k A_k = B @ A.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def rank_owner(ranks: Sequence[int], device=None) -> torch.Tensor:
    """(R,) index of the update each row of the stacked A belongs to: [0]*r_1 + [1]*r_2 + ..."""
    return torch.repeat_interleave(torch.arange(len(ranks), device=device), torch.tensor(list(ranks), device=device))


def gram_inner_products(A: torch.Tensor, B: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """Frobenius inner products of the stacked updates, shape (..., K, K).

    <B_i A_i, B_j A_j>_F = trace(A_i^T B_i^T B_j A_j) = sum((B_i^T B_j) * (A_i A_j^T)), so all K^2 products come
    from the two R x R Gram matrices A A^T and B^T B at a cost of O(R^2 (m + n)). The diagonal holds the
    squared norms ||B_k A_k||_F^2. The blocks are summed by index, never multiplied by 0, so one Inf stays
    in its own entries.
    """
    return inner_products_from_grams(A @ A.mT, B.mT @ B, ranks)


def inner_products_from_grams(AAt: torch.Tensor, BtB: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """gram_inner_products from the Gram matrices A A^T and B^T B (..., R, R) of the stacked factors."""
    products = AAt * BtB
    owner = rank_owner(ranks, products.device)
    shape = products.shape[:-2]
    rows = products.new_zeros((*shape, len(ranks), products.shape[-1])).index_add_(-2, owner, products)
    return rows.new_zeros((*shape, len(ranks), len(ranks))).index_add_(-1, owner, rows)


# A Gram X X^T of at least this many rows is summed on its upper triangle only, by row panels (a syrk by hand: torch
# has none), and mirrored once at the end. With 8 panels of at least 64 rows and pieces of 4096 columns: 0.76x the
# time of the full product at R = 256, 0.65x at 1024, 0.59x at 4096 (measured here, 2 cores, float64; 4 panels:
# 0.69x and 0.61x at 1024 and 4096); below it one product costs less than the panels' launches.
SYMMETRIC_MIN_ROWS = 256
SYMMETRIC_PANELS = 8
SYMMETRIC_PANEL_ROWS = 64


def gram_of_pieces(pieces: Iterable[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The sum of X @ X^T over the pieces X (G, R, c), accumulated in `out` (G, R, R), which holds zeros: a Gram
    matrix summed over slices of its inner dimension. Where R >= SYMMETRIC_MIN_ROWS only the upper triangle is
    computed (SYMMETRIC_PANELS row panels of at least SYMMETRIC_PANEL_ROWS rows: about 9/16 of the products) and the
    blocks below the diagonal blocks are copied from it. Each piece is consumed before the next is asked for (they may share a buffer)."""
    R = out.shape[-1]
    step = R if R < SYMMETRIC_MIN_ROWS else max(SYMMETRIC_PANEL_ROWS, -(-R // SYMMETRIC_PANELS))
    for X in pieces:
        for i in range(0, R, step):
            out[..., i : i + step, i:].baddbmm_(X[..., i : i + step, :], X[..., i:, :].mT)
    for i in range(step, R, step):  # the blocks left of each panel from those above the diagonal
        out[..., i : i + step, :i] = out[..., :i, i : i + step].mT
    return out


def low_rank_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the product B @ A without forming it: returns (L, S, Rt) with B @ A = L diag(S) Rt.

    With B = Qb Rb and A^T = Qa Ra (reduced QR), B A = Qb (Rb Ra^T) Qa^T; the SVD of the small core
    Rb Ra^T = U S V^T gives L = Qb U and Rt = V^T Qa^T. Cost O((m + n) R^2).
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.mT, full_matrices=False)
    L, Rt = canonical_signs(Qb @ U, Vh @ Qa.mT)
    return L, S, Rt


# truncation_from_grams trusts a Cholesky factor of an equilibrated Gram matrix up to this condition number
# bound; its orthogonality error is then below about 1e7 * 2.2e-16, far below the 1e-6 asked of a truncation.
MAX_GRAM_CONDITION = 1e7


def truncation_from_grams(
    AAt: torch.Tensor, BtB: torch.Tensor, rank: int, max_condition: float = MAX_GRAM_CONDITION
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """low_rank_svd from the Gram matrices alone (Cholesky QR): projections (Pb, Pa) such that B_r = B @ Pb
    and A_r = Pa @ A are split_singular's factors of the best rank-`rank` approximation of B @ A.

    AAt = A A^T and BtB = B^T B are (..., R, R). With the Jacobi-scaled Cholesky factors AAt = La La^T and
    BtB = Lb Lb^T, A^T = Qa La^T and B = Qb Lb^T for orthonormal Qa, Qb never formed, so B A = Qb (Lb^T La) Qa^T
    and the SVD of the R x R core Lb^T La = U S V^T gives L = B Lb^-T U and Rt = V^T La^-1 A. Cost: the Grams,
    O((m + n) R^2), plus two thin products, O((m + n) R rank): no QR of the tall factors. Returns
    (Pb (..., R, k), Pa (..., k, R), S (..., R), ok (...)), k = min(rank, R). The implied Qa, Qb are
    orthonormal to about 2.2e-16 times the condition number of the scaled Grams; where a bound of that number
    exceeds `max_condition` (or a Gram is singular: a zero row, the same adapter twice, R above m or n)
    ok is False and that module's results are not to be used (use truncate_low_rank there).
    """
    La, ok_a, scale_a, _ = scaled_cholesky(AAt, max_condition)
    Lb, ok_b, scale_b, _ = scaled_cholesky(BtB, max_condition)
    ok = ok_a & ok_b
    # unscaled factors: AAt = (La / scale_a) (La / scale_a)^T, scale = diag(Gram)^-1/2 as a column
    core = (Lb / scale_b).mT @ (La / scale_a)
    U, S, Vh = torch.linalg.svd(core, full_matrices=False)
    k = min(rank, S.shape[-1])
    root = S[..., :k].sqrt()
    # L = B (Lb / scale_b)^-T U = B diag(scale_b) Lb^-T U ; Rt = Vh (La / scale_a)^-1 A = Vh La^-1 diag(scale_a) A
    Pb = scale_b * torch.linalg.solve_triangular(Lb.mT, U[..., :k], upper=True) * root.unsqueeze(-2)
    Pa = torch.linalg.solve_triangular(La.mT, Vh[..., :k, :].mT, upper=True).mT * scale_a.mT * root.unsqueeze(-1)
    return Pb, Pa, S, ok


def scaled_cholesky(gram: torch.Tensor, max_condition: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, ok, scale, inverse): L L^T = D gram D with D = diag(scale), scale = diag(gram)^-1/2 as an (..., R, 1)
    column, and ok where the factorisation succeeded with a condition bound R ||L^-1||_F^2 below max_condition;
    inverse = L^-1 (computed for the bound anyway: a caller applies it as a product instead of a triangular solve).
    Where not ok, L and its inverse are the identity (harmless numbers, to be discarded)."""
    R = gram.shape[-1]
    diagonal = gram.diagonal(dim1=-2, dim2=-1)
    usable = (diagonal > 0) & torch.isfinite(diagonal).all(-1, keepdim=True)
    scale = torch.where(usable, diagonal, 1.0).rsqrt().unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(gram * scale * scale.mT)
    eye = torch.eye(R, dtype=gram.dtype, device=gram.device)
    ok = (info == 0) & usable.all(-1)
    L = torch.where(ok[..., None, None], L, eye)
    inverse = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    bound = R * inverse.square().sum((-2, -1))
    ok = ok & torch.isfinite(bound) & (bound < max_condition)
    return torch.where(ok[..., None, None], L, eye), ok, scale, torch.where(ok[..., None, None], inverse, eye)


# wide_svd factors a short side of at most this many rows by Cholesky QR (larger ones: LAPACK), where the long side
# is at least WIDE_RATIO times as long, and trusts a pass where the scaled Gram's condition bound stays below
# WIDE_CONDITION (cond below 1e4): after the second pass the implied Q is orthonormal to rounding.
WIDE_ROWS = 512
WIDE_RATIO = 4
WIDE_CONDITION = 1e8
WIDE_ONE_PASS = 1e4
WIDE_MIN_ENTRIES = 2**16  # below this LAPACK costs less than the kernels of Cholesky QR


def wide_svd(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.linalg.svd(X, full_matrices=False) for X (a, b) (or its transpose, b < a), same factorisation up to
    the signs of the singular pairs (and rotations within repeated singular values). Where one side is short (at most
    WIDE_ROWS) and the other WIDE_RATIO times longer, by Cholesky QR twice of the long side from the Jacobi-scaled
    a x a Grams, then the SVD of the a x a factor: a few products instead of LAPACK's bidiagonalisation of the whole
    (a x b) matrix, which costs far more than its flops here. Where a Gram's condition bound exceeds WIDE_CONDITION
    (X rank-deficient or ill-conditioned), LAPACK."""
    if X.shape[-2] > X.shape[-1]:
        x, S, yh = wide_svd(X.mT)
        return yh.mT, S, x.mT
    x, S, yh, Q = wide_svd_parts(X)
    return x, S, yh if Q is None else yh @ Q


def wide_svd_parts(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """wide_svd of a short, wide X (a <= b) as (x, S, vh, Q) with X = x diag(S) vh Q: Q (a, b) with orthonormal rows
    and vh (a, a), so that a caller who scales or truncates the right singular vectors does it to vh and forms
    (...) @ Q once; Q is None where LAPACK factored X (vh then holds the right singular vectors, (a, b))."""
    a, b = X.shape[-2:]
    if not cholesky_qr_pays(a, b):
        return *torch.linalg.svd(X, full_matrices=False), None
    factor, Q = None, X  # X = factor @ Q, Q's rows orthonormal after two passes (one where X is well-conditioned)
    for _ in range(2):
        L, ok, scale, inverse = scaled_cholesky(Q @ Q.mT, WIDE_CONDITION)
        if not bool(ok.all()):
            return *torch.linalg.svd(X, full_matrices=False), None
        # Q Q^T = D^-1 L L^T D^-1: Q = (D^-1 L) Q' with Q' = L^-1 D Q
        Q = (inverse * scale.mT) @ Q
        step = L / scale
        factor = step if factor is None else factor @ step
        if bool((a * inverse.square().sum((-2, -1)) < WIDE_ONE_PASS).all()):
            break  # the scaled Gram's condition below 1e4: Q orthonormal to ~1e4 * 2.2e-16 after this pass already
    return *torch.linalg.svd(factor, full_matrices=False), Q


def cholesky_qr_pays(a: int, b: int) -> bool:
    """Whether wide_svd factors an a x b matrix (a <= b) by Cholesky QR rather than LAPACK."""
    return 0 < a <= WIDE_ROWS and b >= WIDE_RATIO * a and a * b >= WIDE_MIN_ENTRIES


def wide_left_svd(blocks: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, S): the left singular vectors and values of the short, wide X = [w_1 X_1 | ... | w_K X_K] given as
    blocks (K, a, b), from its a x a Gram sum_k w_k^2 X_k X_k^T alone (left_svd_of_gram). None where wide_svd would
    not take Cholesky QR or would want its second pass (call wide_svd then)."""
    K, a, b = blocks.shape
    if not cholesky_qr_pays(a, K * b):
        return None
    return left_svd_of_gram(torch.einsum("k,kij->ij", weights.to(blocks.dtype).square(), blocks @ blocks.mT))


def left_svd_of_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x, S) of a short, wide X from its Gram X X^T (a x a): X = F Q with F the Gram's Jacobi-scaled Cholesky factor
    and Q's rows orthonormal, so F = x diag(S) vh holds X's; wide_svd's first pass without forming Q, for a caller that
    needs x^T X rather than X's right singular vectors. None where the scaled Gram's condition bound says that pass
    would not be orthonormal to rounding (WIDE_ONE_PASS)."""
    L, ok, scale, inverse = scaled_cholesky(gram, WIDE_CONDITION)
    if not bool(ok) or not bool(gram.shape[-1] * inverse.square().sum() < WIDE_ONE_PASS):
        return None
    x, S, _ = torch.linalg.svd(L / scale, full_matrices=False)
    return x, S


def canonical_signs(L: torch.Tensor, Rt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular vector pairs so that the largest entry of each column of L is positive (the first of them
    where +a and -a tie): results then do not depend on the LAPACK build or device. Returns (L, Rt) with
    L diag(S) Rt unchanged."""
    sign = column_signs(L)
    return L * sign, Rt * sign.mT


def column_signs(L: torch.Tensor) -> torch.Tensor:
    """(..., 1, k): +1 or -1 per column of L (..., m, k), the sign that makes its largest entry positive (canonical_signs;
    for callers that fold the signs into a smaller factor or flip L in place)."""
    high, low = L.amax(-2, keepdim=True), L.amin(-2, keepdim=True)  # 3x faster than argmax of |L|, and no |L|
    if bool(((high == -low) & (high > 0)).any()):
        negative = torch.gather(L, -2, L.abs().argmax(dim=-2, keepdim=True)) < 0
    else:
        negative = high < -low
    return torch.where(negative, -1.0, 1.0).to(L.dtype)


def split_singular(L: torch.Tensor, S: torch.Tensor, Rt: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (B_r, A_r) of the rank-`rank` truncation L_r diag(S_r) Rt_r, zero-padded to `rank`; the
    singular values are split evenly: B_r = L_r diag(sqrt(S_r)), A_r = diag(sqrt(S_r)) Rt_r."""
    kept = min(rank, S.shape[-1])
    root = S[..., :kept].sqrt()
    return pad_rank(L[..., :kept] * root.unsqueeze(-2), Rt[..., :kept, :] * root.unsqueeze(-1), rank)


def truncate_low_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation of B @ A (Eckart-Young) as factors (B_r, A_r), never forming B @ A.

    Also returns all singular values S of B @ A: ||B A - B_r A_r||_F = tail_energy(S, rank).
    """
    L, S, Rt = low_rank_svd(B, A)
    return *split_singular(L, S, Rt, rank), S


def truncate_dense(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """truncate_low_rank for an update that exists only densely (after a sparsifying merge rule)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    return *split_singular(U, S, Vh, rank), S


def pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad (B, A) along the rank axis to `rank`; the product B @ A is unchanged."""
    extra = rank - A.shape[-2]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[-2]} down to {rank}")
    if extra == 0:
        return B, A
    return torch.nn.functional.pad(B, (0, extra)), torch.nn.functional.pad(A, (0, 0, 0, extra))


def tail_energy(S: torch.Tensor, rank: int) -> torch.Tensor:
    """sqrt(sum_{i >= rank} S_i^2): the Frobenius norm discarded by truncating to `rank`."""
    return S[..., rank:].square().sum(-1).sqrt()
