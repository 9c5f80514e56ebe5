"""Stack the factors of many same-shaped modules onto a device, so that the math runs as a few batched
kernels instead of a Python loop over hundreds of tiny ones."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .lora import LoraModule

# One batch's stacked float64 factors stay below this many bytes (the caller's memory is a few batches).
DEFAULT_BATCH_BYTES = 256 * 2**20

Term = tuple[int, LoraModule, float]
"""(adapter index, module, weight): the term weight * B @ A of one adapter at one module."""


@dataclass(frozen=True)
class Batch:
    """G modules that have the same contributing adapters, ranks and shape.

    A is (G, R, n) = [A_1; ...; A_K'] and B is (G, m, R) = [w_1 B_1 | ... | w_K' B_K'] per module, so that
    B[g] @ A[g] = sum_k w_k B_k A_k for module paths[g].
    """

    paths: tuple[str, ...]
    members: tuple[int, ...]
    ranks: tuple[int, ...]
    A: torch.Tensor
    B: torch.Tensor


def batches(
    terms: Mapping[str, Sequence[Term]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    max_bytes: int = DEFAULT_BATCH_BYTES,
) -> Iterator[Batch]:
    """Yield Batches covering every module path in `terms` (paths with no terms are skipped)."""
    groups: dict[tuple, list[str]] = {}
    for path, path_terms in terms.items():
        if path_terms:
            first = path_terms[0][1]
            key = (tuple(k for k, _, _ in path_terms), tuple(m.rank for _, m, _ in path_terms), first.A.shape[1], first.B.shape[0])
            groups.setdefault(key, []).append(path)
    item_size = torch.empty((), dtype=dtype).element_size()
    for (members, ranks, n, m), paths in groups.items():
        per_module = sum(ranks) * (n + m) * item_size
        step = max(1, max_bytes // per_module)
        for start in range(0, len(paths), step):
            chunk = tuple(paths[start : start + step])
            yield Batch(chunk, members, ranks, *_stack([terms[p] for p in chunk], ranks, n, m, device, dtype))


def _stack(chunk, ranks, n, m, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    R = sum(ranks)
    A = torch.empty((len(chunk), R, n), dtype=dtype, device=device)
    B = torch.empty((len(chunk), m, R), dtype=dtype, device=device)
    for g, path_terms in enumerate(chunk):
        offset = 0
        for (_, module, weight), r in zip(path_terms, ranks):
            A[g, offset : offset + r].copy_(module.A)
            B[g, :, offset : offset + r].copy_(module.B).mul_(weight)
            offset += r
    return A, B
