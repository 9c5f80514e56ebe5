"""Norms and inner products of every adapter's update, from r x r Gram matrices (see gram.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batching import DEFAULT_BATCH_BYTES, Group, chunk_bytes, groups, modules_per_piece, stacked_chunks
from .gram import gram_of_pieces, inner_products_from_grams
from .errors import NanPeftError
from .lora import LoraAdapter


# A piece of the stacks (batching.stacked_chunks) holds at least this many of the long dimension's columns where the
# stacks are tall: the inner dimension of the Gram products, long enough for the GEMM rate. 64 adapters of rank 16
# (R = 1024: 32 MiB pieces): 0.74 s a 7B layer, against 0.92 s with the 512 columns of a 4 MiB piece.
GRAM_COLUMNS = 4096


class _Norms:
    """module_norms and adapter_norms from `squared` (M, K): what the coefficient providers read."""

    squared: torch.Tensor

    @property
    def module_norms(self) -> torch.Tensor:
        """(M, K): ||dW_k||_F at each module (0 where absent)."""
        return self.squared.clamp_min(0).sqrt()

    @property
    def adapter_norms(self) -> torch.Tensor:
        """(K,): the norm of each adapter's whole update, sqrt(sum over modules ||dW_k,m||_F^2)."""
        return self.squared.sum(0).clamp_min(0).sqrt()


@dataclass(frozen=True)
class UpdateNorms(_Norms):
    """||dW_k||_F^2 of every adapter's update at every module (squared, (M, K), float64 on the CPU; 0 where absent),
    from each adapter's own r x r Grams: all that NAN, uniform and manual coefficients need (update_norms)."""

    adapter_names: tuple[str, ...]
    modules: tuple[str, ...]
    squared: torch.Tensor
    present: torch.Tensor


@dataclass(frozen=True)
class UpdateGram(_Norms):
    """Inner products <dW_i, dW_j>_F of the adapters' updates, module by module, in float64 on the CPU.

    inner[m, i, j] is the inner product at module `modules[m]`; it is 0 where adapter i or j does not
    adapt that module (present[m, i] is False).
    """

    adapter_names: tuple[str, ...]
    modules: tuple[str, ...]
    inner: torch.Tensor
    present: torch.Tensor

    @property
    def squared(self) -> torch.Tensor:
        """(M, K): ||dW_k||_F^2, the diagonal of inner."""
        return self.inner.diagonal(dim1=-2, dim2=-1)

    @property
    def adapter_inner(self) -> torch.Tensor:
        """(K, K): inner products of the adapters' whole updates."""
        return self.inner.sum(0)

    def cosine_similarity(self) -> torch.Tensor:
        """(K, K): cosine similarity of the adapters' whole updates (0 against an all-zero update)."""
        norms = self.adapter_norms
        outer = torch.outer(norms, norms)
        return torch.where(outer > 0, self.adapter_inner / outer.clamp_min(torch.finfo(outer.dtype).tiny), 0.0)

    def merged_norms(self, coefficients: torch.Tensor) -> torch.Tensor:
        """(M,): ||sum_k c[m, k] dW_k,m||_F for per-module coefficients c (M, K) (or (K,) for all modules)."""
        c = coefficients.to(self.inner.dtype).expand(len(self.modules), len(self.adapter_names))
        return torch.einsum("mi,mij,mj->m", c, self.inner, c).clamp_min(0).sqrt()


def update_gram(
    adapters: Sequence[LoraAdapter],
    device: torch.device | str = "cpu",
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> UpdateGram:
    """Compute every <dW_i, dW_j>_F at every module, dW_k = s_k B_k A_k, in float64 on `device`.

    Modules of the same shape and the same set of adapters are stacked and handled by batched Gram products,
    so a 7B-sized adapter costs a few hundred kernels, not thousands. The stacks are converted to float64 a
    piece at a time (batching.stacked_chunks: cache-sized, or GRAM_COLUMNS columns where the stacks are tall) and the
    Grams summed over the pieces: the products of the factors' entries are exact in float64 and every sum is a float64
    sum. max_batch_bytes bounds the float64 buffer.
    """
    inner = InnerProducts(adapters)
    found = groups(_scaled_terms(adapters, inner.modules))
    buffer = gram_buffer(found, device, max_batch_bytes)
    for group in found:
        for piece in grams_by_piece(group, buffer):
            inner.add(group, *piece)
    return inner.result()


class InnerProducts:
    """UpdateGram.inner summed from the unweighted factor Grams (A A^T, B^T B) of groups of modules, as factor_grams
    gives them: update_gram's pass, or the svd merge's own (truncation.truncate_groups' on_grams), which then needs
    no second one. Each group's terms may carry any weights: the adapters' scales s_k are applied here."""

    def __init__(self, adapters: Sequence[LoraAdapter]):
        self.adapters = adapters
        self.modules = _module_paths(adapters)
        self.index = {path: m for m, path in enumerate(self.modules)}
        self.inner = torch.zeros((len(self.modules), len(adapters), len(adapters)), dtype=torch.float64)

    def add(self, group: Group, start: int, stop: int, AAt: torch.Tensor, BtB: torch.Tensor) -> None:
        """Take the Grams of modules group.paths[start:stop] (the group's members: every adapter present there)."""
        chunk = group.terms[start:stop]
        scales = torch.tensor([[module.scale for (_, module, _), r in zip(path_terms, group.ranks) for _ in range(r)] for path_terms in chunk],
                              dtype=BtB.dtype, device=BtB.device).reshape(len(chunk), group.rank)
        BtB = BtB * (scales[:, :, None] * scales[:, None, :])
        products = inner_products_from_grams(AAt, BtB, group.ranks).cpu()
        rows = torch.tensor([self.index[p] for p in group.paths[start:stop]])
        members = torch.tensor(group.members)
        self.inner[rows[:, None, None], members[None, :, None], members[None, None, :]] = products

    def result(self, norms: UpdateNorms | None = None) -> UpdateGram:
        """The UpdateGram of what was added (every module must have been), its diagonal taken from `norms` where given
        (the norms the coefficients were computed from, to the last bit). Refuses a non-finite inner product."""
        inner, adapters, modules = self.inner, self.adapters, self.modules
        if norms is not None:
            inner.diagonal(dim1=-2, dim2=-1).copy_(norms.squared)
        if not torch.isfinite(inner).all():
            bad = ~torch.isfinite(inner.diagonal(dim1=-2, dim2=-1))
            m, k = bad.nonzero()[0].tolist() if bad.any() else (~torch.isfinite(inner)).nonzero()[0, :2].tolist()
            raise NanPeftError(f"the update of {adapters[k].name} at {modules[m]} has a non-finite norm (NaN, Inf or too large)")
        return UpdateGram(tuple(a.name for a in adapters), modules, inner, _present(adapters, modules))


def update_norms(adapters: Sequence[LoraAdapter], device: torch.device | str = "cpu", max_batch_bytes: int = DEFAULT_BATCH_BYTES) -> UpdateNorms:
    """||dW_k||_F^2 = s_k^2 sum((B_k^T B_k) * (A_k A_k^T)) of every adapter at every module, in float64 on `device`,
    from each adapter's own r x r Grams: (K r^2) (m + n) flops a module where the inner products cost (K r)^2 (m + n)
    (0.1 s a 7B layer of 64 adapters here, against 0.75 s). The stacks of same-shaped modules stream through one
    reused float64 buffer as update_gram's do (fresh memory for whole stacks costs page faults: 4x the time on a
    whole 7B model), each piece giving every adapter's diagonal block. What the coefficients need before the svd
    merge sums the Grams once (merge.merge_sources). Refuses a non-finite norm."""
    modules = _module_paths(adapters)
    index = {path: m for m, path in enumerate(modules)}
    squared = torch.zeros((len(modules), len(adapters)), dtype=torch.float64)
    found = groups(_scaled_terms(adapters, modules))
    buffer = gram_buffer(found, device, max_batch_bytes)
    for group in found:
        step = modules_per_piece(group, 8, buffer.numel() * 8)
        for start in range(0, len(group.paths), step):
            AAt, BtB = (_diagonal_blocks(group, side, buffer, start, start + step) for side in "AB")
            scales = torch.tensor([[module.scale for _, module, _ in path_terms] for path_terms in group.terms[start : start + step]],
                                  dtype=torch.float64, device=device)
            values = torch.stack([(b * a).sum((-2, -1)) for a, b in zip(AAt, BtB)], -1) * scales.square()
            rows = torch.tensor([index[p] for p in group.paths[start : start + step]])
            squared[rows[:, None], torch.tensor(group.members)[None, :]] = values.cpu()
    if not torch.isfinite(squared).all():
        m, k = (~torch.isfinite(squared)).nonzero()[0].tolist()
        raise NanPeftError(f"the update of {adapters[k].name} at {modules[m]} has a non-finite norm (NaN, Inf or too large)")
    return UpdateNorms(tuple(a.name for a in adapters), modules, squared, _present(adapters, modules))


def _diagonal_blocks(group: Group, side: str, buffer: torch.Tensor, start: int, stop: int) -> list[torch.Tensor]:
    """[A_k A_k^T or B_k^T B_k (G, r_k, r_k) for each member k]: the diagonal blocks of factor_grams' Grams alone,
    summed over the pieces of stacked_chunks (one batched product a piece where the ranks are equal)."""
    G, ranks = len(group.paths[start:stop]), group.ranks
    if len(set(ranks)) == 1:
        K, r = len(ranks), ranks[0]
        total = buffer.new_zeros((G, K, r, r))
        for _, piece in stacked_chunks(group, side, buffer, start, stop):
            parts = piece.unflatten(-2, (K, r)) if side == "A" else piece.unflatten(-1, (K, r)).movedim(-2, 1).mT  # (G, K, r, c)
            total += parts @ parts.mT
        return list(total.unbind(1))
    offsets = [sum(ranks[:k]) for k in range(len(ranks))]
    blocks = [buffer.new_zeros((G, r, r)) for r in ranks]
    for _, piece in stacked_chunks(group, side, buffer, start, stop):
        X = piece if side == "A" else piece.mT  # (G, R, c)
        for k, (offset, r) in enumerate(zip(offsets, ranks)):
            part = X[:, offset : offset + r]
            blocks[k].baddbmm_(part, part.mT)
    return blocks


def _module_paths(adapters: Sequence[LoraAdapter]) -> tuple[str, ...]:
    return tuple(sorted({path for adapter in adapters for path in adapter.modules}))


def _scaled_terms(adapters: Sequence[LoraAdapter], modules: Sequence[str]) -> dict[str, list]:
    """Per module path, the terms (k, module, s_k) of the adapters present there: their updates s_k B_k A_k."""
    return {path: [(k, a.modules[path], a.modules[path].scale) for k, a in enumerate(adapters) if path in a.modules] for path in modules}


def _present(adapters: Sequence[LoraAdapter], modules: Sequence[str]) -> torch.Tensor:
    return torch.tensor([[path in a.modules for a in adapters] for path in modules], dtype=torch.bool).reshape(len(modules), len(adapters))


def gram_buffer(found: Sequence[Group], device: torch.device | str, max_batch_bytes: int) -> torch.Tensor:
    """The float64 buffer that stacked_chunks converts the stacks of these groups into for factor_grams: cache-sized,
    or GRAM_COLUMNS columns of the tallest stacks, at most max_batch_bytes. update_gram and the exact truncation
    (truncation.truncate_groups) size it alike, so both sum the same Grams in the same order."""
    tallest = max((group.rank for group in found), default=0)
    piece_bytes = min(max(chunk_bytes(device), 8 * tallest * GRAM_COLUMNS), max_batch_bytes)
    return torch.empty(piece_bytes // 8, dtype=torch.float64, device=device)


def grams_by_piece(group: Group, buffer: torch.Tensor, first: int = 0, last: int | None = None):
    """Yield (start, stop, A A^T, B^T B) for the modules of group.paths[first:last], as many at a time as one piece
    of `buffer` holds whole (factor_grams)."""
    last = len(group.paths) if last is None else last
    step = modules_per_piece(group, buffer.element_size(), buffer.numel() * buffer.element_size())
    for start in range(first, last, step):
        stop = min(last, start + step)
        yield (start, stop, *factor_grams(group, buffer, start, stop))


def factor_grams(group: Group, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A A^T, B^T B), each (G, R, R) in buffer's dtype and device, of the unweighted stacked factors of modules
    group.paths[start:stop], summed over pieces converted into `buffer` (batching.stacked_chunks)."""
    G, R = len(group.paths[start:stop]), group.rank
    AAt = gram_of_pieces((piece for _, piece in stacked_chunks(group, "A", buffer, start, stop)), buffer.new_zeros((G, R, R)))
    BtB = gram_of_pieces((piece.mT for _, piece in stacked_chunks(group, "B", buffer, start, stop)), buffer.new_zeros((G, R, R)))
    return AAt, BtB
