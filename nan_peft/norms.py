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


@dataclass(frozen=True)
class UpdateGram:
    """Inner products <dW_i, dW_j>_F of the adapters' updates, module by module, in float64 on the CPU.

    inner[m, i, j] is the inner product at module `modules[m]`; it is 0 where adapter i or j does not
    adapt that module (present[m, i] is False).
    """

    adapter_names: tuple[str, ...]
    modules: tuple[str, ...]
    inner: torch.Tensor
    present: torch.Tensor

    @property
    def module_norms(self) -> torch.Tensor:
        """(M, K): ||dW_k||_F at each module (0 where absent)."""
        return self.inner.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()

    @property
    def adapter_norms(self) -> torch.Tensor:
        """(K,): the norm of each adapter's whole update, sqrt(sum over modules ||dW_k,m||_F^2)."""
        return self.inner.diagonal(dim1=-2, dim2=-1).sum(0).clamp_min(0).sqrt()

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
    modules = tuple(sorted({path for adapter in adapters for path in adapter.modules}))
    index = {path: m for m, path in enumerate(modules)}
    K = len(adapters)
    terms = {
        path: [(k, a.modules[path], a.modules[path].scale) for k, a in enumerate(adapters) if path in a.modules]
        for path in modules
    }
    inner = torch.zeros((len(modules), K, K), dtype=torch.float64)
    found = groups(terms)
    buffer = gram_buffer(found, device, max_batch_bytes)
    for group in found:
        step = modules_per_piece(group, 8, buffer.numel() * 8)
        weights = group.weights(device=device)
        members = torch.tensor(group.members)
        for start in range(0, len(group.paths), step):
            AAt, BtB = factor_grams(group, buffer, start, start + step)
            BtB *= weights[start : start + step, :, None] * weights[start : start + step, None, :]
            products = inner_products_from_grams(AAt, BtB, group.ranks).cpu()
            rows = torch.tensor([index[p] for p in group.paths[start : start + step]])
            inner[rows[:, None, None], members[None, :, None], members[None, None, :]] = products
    if not torch.isfinite(inner).all():
        bad = ~torch.isfinite(inner.diagonal(dim1=-2, dim2=-1))
        m, k = bad.nonzero()[0].tolist() if bad.any() else (~torch.isfinite(inner)).nonzero()[0, :2].tolist()
        raise NanPeftError(f"the update of {adapters[k].name} at {modules[m]} has a non-finite norm (NaN, Inf or too large)")
    present = torch.tensor([[path in a.modules for a in adapters] for path in modules], dtype=torch.bool).reshape(len(modules), K)
    return UpdateGram(tuple(a.name for a in adapters), modules, inner, present)


def gram_buffer(found: Sequence[Group], device: torch.device | str, max_batch_bytes: int) -> torch.Tensor:
    """The float64 buffer that stacked_chunks converts the stacks of these groups into for factor_grams: cache-sized,
    or GRAM_COLUMNS columns of the tallest stacks, at most max_batch_bytes. update_gram and the exact truncation
    (truncation.truncate_groups) size it alike, so both sum the same Grams in the same order."""
    tallest = max((group.rank for group in found), default=0)
    piece_bytes = min(max(chunk_bytes(device), 8 * tallest * GRAM_COLUMNS), max_batch_bytes)
    return torch.empty(piece_bytes // 8, dtype=torch.float64, device=device)


def factor_grams(group: Group, buffer: torch.Tensor, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A A^T, B^T B), each (G, R, R) in buffer's dtype and device, of the unweighted stacked factors of modules
    group.paths[start:stop], summed over pieces converted into `buffer` (batching.stacked_chunks)."""
    G, R = len(group.paths[start:stop]), group.rank
    AAt = gram_of_pieces((piece for _, piece in stacked_chunks(group, "A", buffer, start, stop)), buffer.new_zeros((G, R, R)))
    BtB = gram_of_pieces((piece.mT for _, piece in stacked_chunks(group, "B", buffer, start, stop)), buffer.new_zeros((G, R, R)))
    return AAt, BtB
