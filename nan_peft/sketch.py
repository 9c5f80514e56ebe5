"""Randomized truncation of an operator known only by its products (Halko, Martinsson and Tropp 2011; block
Krylov as Musco and Musco 2015): the best rank-k approximation of M restricted to a range found from M @ Omega for
a seeded random Omega, never the dense M.

For a LoRA merge M = B @ A with B (m x R) and A (R x n), one product M @ X = B @ (A @ X) costs 2 (m + n) R l for
l columns, so the whole truncation costs O((m + n) R l (q + 1)), linear in R, where the exact core SVD (gram.py)
costs O((m + n) R^2 + R^3). The result is the best rank-k approximation of Q Q^T M for the orthonormal basis Q
found, so ||M - M_k||_F^2 = ||M||_F^2 - sum(S_k^2) up to the products' rounding; a caller that needs the discarded
norm exactly computes it from the factors (truncation._discarded does, from the Grams' ||M||_F).

Where the R x R Grams of the factors are summed anyway (an exact truncation would need them; a merge sums them for
its inner products), randomized_from_grams runs the same block Krylov iteration on them alone: O((q + 1) R^2 l) after
the Grams, nothing of size m or n but the two products that form the result.

Pure, batched over leading dimensions (G same-shaped operators at once), device-agnostic; the random test
matrices are drawn on the CPU in float32 from (seed, module path) alone, so results depend on neither the order
nor the batching of modules nor the device they run on.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

from .gram import canonical_signs, scaled_cholesky

Apply = Callable[[torch.Tensor], torch.Tensor]
"""X (..., n, l) -> M @ X (..., m, l), or Y (..., m, l) -> M^T @ Y (..., n, l)."""


def seeded_gaussians(paths: Sequence[str], n: int, columns: int, seed: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """(G, n, columns) standard Gaussian test matrices, one per module path, each from a CPU generator seeded with
    crc32(f"{seed}:{path}") (as the DARE rule seeds its masks): the same numbers on every device and run. Drawn in
    float32 (6x faster here than float64 and its conversion; a test matrix needs no more precision, and widening
    to float64 is exact)."""
    out = torch.empty((len(paths), n, columns), dtype=torch.float32)
    for g, path in enumerate(paths):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{path}".encode()))
        out[g].normal_(generator=generator)
    return out.to(device=device, dtype=dtype)


def randomized_svd(
    apply: Apply, apply_t: Apply, omega: torch.Tensor, rank: int, power_iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L (..., m, k), S (..., c), Rt (..., k, n)), k = min(rank, c): L diag(S[:k]) Rt is the best rank-k
    approximation of Q Q^T M, Q (m x c) an orthonormal basis of the block Krylov space
    [M Omega, (M M^T) M Omega, ..., (M M^T)^q M Omega], q = power_iterations, c <= (q + 1) l, l = omega.shape[-1].

    Block Krylov iteration (Musco and Musco 2015): block j is Q_j = orth(M X_j), X_0 = Omega and
    X_{j+1} = orth(M^T Q_j), each block orthogonalised against the earlier ones. The products M^T Q_j are kept,
    so C^T = M^T Q = [M^T Q_0 | ... | M^T Q_q] costs nothing more: 2 (q + 1) products with l columns in all, as
    many as q power iterations of plain subspace iteration, which it beats by far on the flat spectra of many
    merged adapters (its error falls with the square root of the spectral gap, not the gap). The top-k
    eigenvectors W_k of C C^T (c x c) give L = Q W_k and Rt = diag(S_k)^-1 W_k^T C (0 where S_k = 0), so that
    L diag(S_k) Rt = Q W_k W_k^T Q^T M, an orthogonal projection of M, however well W_k was resolved. S holds
    every singular value of Q^T M, largest first: sum(S^2) = ||Q^T M||_F^2 and
    ||M - L diag(S_k) Rt||_F^2 = ||M||_F^2 - sum(S[:k]^2) (to the products' rounding). Signs as gram.canonical_signs
    picks them (the largest entry of each column of L positive).

    The products run in omega's dtype (float32 halves their cost), and so do C^T (kept as the products gave it), its
    Gram C C^T and Rt's product with W_k: their rounding is the products' own. The bases, the c x c eigenproblem and
    the results are float64 (a float32 Cholesky QR loses the range of a rank-deficient block). The Rayleigh-Ritz
    subspace is stationary in C C^T's rounding: on the 64-adapter bench case the float32 Gram moved the exact discarded
    norm by 7e-15 relative against a float64 one, at 6% less time. Everything is BLAS-3 (Cholesky QR, a c x c eigenproblem):
    Householder QR and the SVD of a tall matrix cost more here than the products themselves."""
    wide = torch.promote_types(omega.dtype, torch.float64)
    basis = Ct = None  # [Q_0 | Q_1 | ...] in float64 and [M^T Q_0 | M^T Q_1 | ...] in the products' dtype, block by block
    used, X = 0, omega
    for step in range(power_iterations + 1):
        Y = apply(X.to(omega.dtype))
        if basis is None:
            width = min(Y.shape[-2], (power_iterations + 1) * omega.shape[-1])
            basis = Y.new_empty((*Y.shape[:-1], width), dtype=wide)
        Q = orthonormal_basis(Y, basis[..., :used] if used else None)
        if Q.shape[-1] == 0:
            break
        basis[..., used : used + Q.shape[-1]] = Q
        product = apply_t(Q.to(omega.dtype))
        if Ct is None:
            Ct = product.new_empty((*product.shape[:-1], basis.shape[-1]))
        Ct[..., used : used + Q.shape[-1]] = product
        used += Q.shape[-1]
        if step < power_iterations:
            X = orthonormal_basis(product, passes=1)  # the next block's input: any well-conditioned basis
    Q, Ct = basis[..., :used], Ct[..., :used]
    values, W = torch.linalg.eigh((Ct.mT @ Ct).to(wide))  # ascending
    values, W = values.flip(-1), W.flip(-1)
    S = values.clamp_min(0).sqrt()
    k = min(rank, S.shape[-1])
    Wk, Sk = W[..., :k], S[..., :k]
    L = Q @ Wk
    Rt = (Ct @ Wk.to(Ct.dtype)).to(wide).mT / torch.where(Sk > 0, Sk, 1.0).unsqueeze(-1) * (Sk > 0).unsqueeze(-1)
    L, Rt = canonical_signs(L, Rt)
    return L, S, Rt


# orthonormal_basis trusts Cholesky QR where a bound on the condition number of the Jacobi-scaled Gram Y^T Y stays
# below this (cond(Y) below ~1e4): its first pass then leaves Q orthonormal to ~1e-8 and the second to rounding.
CHOLESKY_QR_CONDITION = 1e8


def orthonormal_basis(Y: torch.Tensor, before: torch.Tensor | None = None, passes: int = 2) -> torch.Tensor:
    """(..., m, c) in float64: an orthonormal basis of the span of Y's columns with the span of `before` (an
    orthonormal float64 (..., m, b) basis, or None) projected out; c = Y's columns, or fewer where m - b leaves less
    room.

    Cholesky QR twice (Y D = Q L^T from the Jacobi-scaled Gram D Y^T Y D = L L^T, as gram.truncation_from_grams
    does, Q = Y D L^-T as a product with the inverse that the condition bound needs anyway: a batched triangular solve
    runs far below the GEMM rate; the second pass makes the first orthonormal to rounding), with the projection repeated before each pass
    (classical Gram-Schmidt twice; passes=1: one pass, orthonormal to ~1e-8 only). Where a Cholesky factor fails or the scaled Gram's condition bound passes
    CHOLESKY_QR_CONDITION (Y of lower rank than its columns, or ill-conditioned), Householder QR does the same passes
    instead: its Q is orthonormal whatever Y's rank. BLAS-3 on the fast path: Householder QR of a tall block costs
    more here than the products that made it."""
    Y = Y.to(torch.promote_types(Y.dtype, torch.float64))
    room = Y.shape[-2] - (before.shape[-1] if before is not None else 0)
    Y = Y[..., : max(0, min(Y.shape[-1], room))]
    if Y.shape[-1] == 0:
        return Y
    Q = Y
    for _ in range(passes):
        if before is not None:
            Q = torch.baddbmm(Q, before, before.mT @ Q, alpha=-1) if Q.dim() == 3 else Q - before @ (before.mT @ Q)
        _, ok, scale, inverse = scaled_cholesky(Q.mT @ Q, CHOLESKY_QR_CONDITION)
        if not bool(ok.all()):
            break
        Q = Q @ (scale * inverse.mT)  # Q D L^-T: one product with the inverse the condition bound computed
    else:
        return Q
    Q = Y
    for _ in range(2):
        if before is not None:
            Q = Q - before @ (before.mT @ Q)
        Q = torch.linalg.qr(Q).Q
    return Q


def randomized_from_grams(
    AAt: torch.Tensor, BtB: torch.Tensor, weights: torch.Tensor, omega: torch.Tensor, rank: int, power_iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """randomized_svd's block Krylov truncation of M = B diag(w) A from the Grams of its factors alone: AAt = A A^T,
    BtB = B^T B (..., R, R, float64, unweighted), w = weights (..., R). Returns (Pb (..., R, k), S (..., c), Pa
    (..., k, R), ok (...)): B Pb and Pa A are split_singular's factors of the rank-k result (k = min(rank, c)), S the
    singular values of Q^T M, largest first; where ok is False (a block the Grams cannot orthonormalise: B of lower
    rank than R, or too ill-conditioned) the module's numbers are not to be used.

    Every m-vector of the Krylov space lies in the range of B, so it is kept as its coefficients z (y = B z), and
    the metric of the m-space is <B z, B z'> = z^T BtB z'. M M^T B z = B (W AAt W BtB z), W = diag(w), so a block
    costs products of R x R Grams with l columns, nothing of size m or n: the start block is the coefficients of
    M (A^T W Omega) (Omega (..., R, l) Gaussian: a start in A's row space), each block is orthonormalised in the
    metric against the earlier ones (classical Gram-Schmidt twice, Cholesky QR of the l x l metric Gram as
    orthonormal_basis does), and the next is M M^T applied to it. With Z (R x c) the basis coefficients, Q = B Z,
    C^T = M^T Q = A^T (W BtB Z) and C C^T = (W BtB Z)^T AAt (W BtB Z); its top-k eigenvectors V_k and values S_k^2
    give L = B (Z V_k) and Rt = S_k^-1 V_k^T (W BtB Z)^T A, as randomized_svd's Rayleigh-Ritz step does. The same
    Krylov space as randomized_svd on the factors (another start block) at O((q + 1) R^2 l) instead of
    O((q + 1) (m + n) R l): the better choice where the Grams are summed anyway (combine's exact path and norms)."""
    # Jacobi scaling, as scaled_cholesky's: M = (B Db)(Db^-1 W Da)(Da^-1 A) with Db, Da the column norms of B and the
    # row norms of A, so that columns of very different sizes (a decaying spectrum, adapters of different scales) do not
    # make the metric ill-conditioned
    b, a = (g.diagonal(dim1=-2, dim2=-1).sqrt() for g in (BtB, AAt))
    b, a = torch.where(b > 0, b, 1.0), torch.where(a > 0, a, 1.0)
    BtB = BtB / (b.unsqueeze(-1) * b.unsqueeze(-2))
    AAt = AAt / (a.unsqueeze(-1) * a.unsqueeze(-2))
    w = (weights.to(AAt.dtype) * b * a).unsqueeze(-1)
    l = omega.shape[-1]
    width = (power_iterations + 1) * l
    Z = AAt.new_empty((*AAt.shape[:-1], width))
    GZ = torch.empty_like(Z)  # BtB Z
    AWGZ = torch.empty_like(Z)  # AAt W BtB Z: each block's product feeds the next block and C C^T
    ok = torch.ones(AAt.shape[:-2], dtype=torch.bool, device=AAt.device)
    z = w * (AAt @ (w * omega.to(AAt.dtype)))
    for step in range(power_iterations + 1):
        used = step * l
        Gz = BtB @ z
        for _ in range(2):
            if used:  # z - Z (Z^T BtB z), and BtB of it from the basis' own BtB Z: no second R x R product
                coefficients = GZ[..., :used].mT @ z
                z = torch.baddbmm(z, Z[..., :used], coefficients, alpha=-1) if z.dim() == 3 else z - Z[..., :used] @ coefficients
                Gz = torch.baddbmm(Gz, GZ[..., :used], coefficients, alpha=-1) if z.dim() == 3 else Gz - GZ[..., :used] @ coefficients
            _, fine, scale, inverse = scaled_cholesky(z.mT @ Gz, CHOLESKY_QR_CONDITION)
            ok &= fine
            step_inverse = scale * inverse.mT
            z, Gz = z @ step_inverse, Gz @ step_inverse
        Z[..., used : used + l], GZ[..., used : used + l] = z, Gz
        AWGZ[..., used : used + l] = AAt @ (w * Gz)
        z = w * AWGZ[..., used : used + l]
    WGZ = w * GZ
    values, V = torch.linalg.eigh(WGZ.mT @ AWGZ)  # ascending
    values, V = values.flip(-1), V.flip(-1)
    S = values.clamp_min(0).sqrt()
    k = min(rank, S.shape[-1])
    Vk, Sk = V[..., :k], S[..., :k]
    root = Sk.sqrt()
    Pb = Z @ Vk * root.unsqueeze(-2) / b.unsqueeze(-1)
    Pa = (WGZ @ Vk).mT / torch.where(Sk > 0, root, 1.0).unsqueeze(-1) * (Sk > 0).unsqueeze(-1) / a.unsqueeze(-2)
    return Pb, S, Pa, ok


def factored(B: torch.Tensor, A: torch.Tensor, weights: torch.Tensor | None = None) -> tuple[Apply, Apply]:
    """(apply, apply_t) of M = B diag(weights) A for whole factors B (..., m, R) and A (..., R, n) and the weight of
    each of the R columns of B (rows of A), (..., R) or None for all 1: M X = B (w * (A X)), never B A. With the
    weights apart, the stacks hold the factors' own values (a caller reads them again exactly, truncation._discarded)
    and weighting costs R l products a block instead of a pass over B."""
    # M^T Y as (Y^T B diag(w) A)^T: products with the stacks as stored (row-major B (m x R), A (R x n)) run up to
    # 1.6x faster here than with their transposes (B^T Y, A^T Z: a long inner dimension over strided rows)
    if weights is None:
        return (lambda X: B @ (A @ X)), (lambda Y: ((Y.mT @ B) @ A).mT)
    w = weights.to(A.dtype).unsqueeze(-1)
    return (lambda X: B @ (w * (A @ X))), (lambda Y: (((Y.mT @ B) * w.mT) @ A).mT)
