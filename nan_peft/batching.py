"""Stack the factors of many same-shaped modules onto a device, so that the math runs as a few batched
kernels instead of a Python loop over hundreds of tiny ones.

`groups` finds the modules that stack together (same contributing adapters, ranks and shape); `stacked_chunks`
streams their stacks (G, R, n) and (G, m, R) through one small reusable buffer, a slice of the long dimension
at a time, so that each converted piece is still in cache when the batched product reads it (whole float64
stacks would write fresh memory several times the inputs' size, and fresh memory costs page faults): the Gram
matrices (norms.py) and the truncation (truncation.py) accumulate over the pieces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .lora import LoraModule

# One batch's stacked float64 factors stay below this many bytes (the caller's memory is a few batches).
DEFAULT_BATCH_BYTES = 256 * 2**20
# One converted piece of a stack (stacked_chunks): small enough to stay in cache, large enough that each
# batched product is efficient and there are few of them (measured best at 4 MiB here, 1 and 2 threads).
# On a GPU, where launches cost more than memory, pieces are large.
CPU_CHUNK_BYTES = 4 * 2**20
GPU_CHUNK_BYTES = 256 * 2**20

Term = tuple[int, LoraModule, float]
"""(adapter index, module, weight): the term weight * B @ A of one adapter at one module."""


@dataclass(frozen=True)
class Group:
    """G modules that have the same contributing adapters, ranks and shape (A_k is r_k x n, B_k is m x r_k),
    with their terms; the stacks are built piece by piece by stacked_chunks."""

    paths: tuple[str, ...]
    members: tuple[int, ...]
    ranks: tuple[int, ...]
    n: int
    m: int
    terms: tuple[tuple[Term, ...], ...]

    @property
    def rank(self) -> int:
        return sum(self.ranks)

    def weights(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """(G, R): the weight of each row of the stacked A (column of the stacked B): w_k repeated r_k times."""
        values = [[w for (_, _, w), r in zip(path_terms, self.ranks) for _ in range(r)] for path_terms in self.terms]
        return torch.tensor(values, dtype=dtype, device=device).reshape(len(self.paths), self.rank)


def groups(terms: Mapping[str, Sequence[Term]]) -> list[Group]:
    """The module paths of `terms` grouped by contributing adapters, ranks and shape (paths with no terms are
    skipped), in the order of `terms`."""
    found: dict[tuple, list[str]] = {}
    for path, path_terms in terms.items():
        if path_terms:
            first = path_terms[0][1]
            key = (tuple(k for k, _, _ in path_terms), tuple(m.rank for _, m, _ in path_terms), first.A.shape[1], first.B.shape[0])
            found.setdefault(key, []).append(path)
    result = []
    for (members, ranks, n, m), paths in found.items():
        result.append(Group(tuple(paths), members, ranks, n, m, tuple(tuple(terms[p]) for p in paths)))
    return result


def chunk_bytes(device: torch.device | str) -> int:
    """The size of the pieces stacked_chunks converts at a time on `device`."""
    return CPU_CHUNK_BYTES if torch.device(device).type == "cpu" else GPU_CHUNK_BYTES


def modules_per_piece(group: Group, item_size: int, max_bytes: int) -> int:
    """How many of the group's modules one piece of at most `max_bytes` holds whole (at least 1)."""
    return max(1, max_bytes // (group.rank * max(group.n, group.m) * item_size))


def stacked_chunks(
    group: Group,
    side: str,
    buffer: torch.Tensor,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Yield the stacked factors of modules group.paths[start:stop] one slice of their long dimension at a time,
    converted into `buffer` (a flat tensor whose dtype and device the pieces get; each piece overwrites the
    previous one, so use it before asking for the next).

    side "A": pieces (G, R, c) of [A_1; ...; A_K][:, s], s a slice of the n columns;
    side "B": pieces (G, c, R) of [B_1 | ... | B_K][s, :], s a slice of the m rows. The weights are not applied.
    A piece holds at least one column (row) of the G stacks, G * R values: where `buffer` is smaller than that
    (a tiny max_batch_bytes), the pieces go to a fresh buffer of exactly that size instead.
    """
    chunk = group.terms[start:stop]
    G, R = len(chunk), group.rank
    if buffer.numel() < G * R:
        buffer = buffer.new_empty(G * R)
    length = group.n if side == "A" else group.m
    step = max(1, min(length, buffer.numel() // (G * R)))
    step = -(-length // -(-length // step))  # pieces of even sizes: no small last one
    for begin in range(0, length, step):
        end = min(length, begin + step)
        piece = buffer[: G * R * (end - begin)]
        piece = piece.view(G, R, end - begin) if side == "A" else piece.view(G, end - begin, R)
        for g, path_terms in enumerate(chunk):
            offset = 0
            for (_, module, _), r in zip(path_terms, group.ranks):
                if side == "A":
                    piece[g, offset : offset + r].copy_(module.A[:, begin:end])
                else:
                    piece[g, :, offset : offset + r].copy_(module.B[begin:end])
                offset += r
        yield slice(begin, end), piece


def stack_terms(chunk, ranks, n, m, device, dtype, out=None, weighted: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacks (A (G, R, n), B (G, m, R)) of the chunk's terms, the weights applied to B (unless not
    `weighted`: the factors' own values); written into out = (A, B) when given (buffers reused across batches)."""
    R = sum(ranks)
    if out is not None:
        A, B = out
    else:
        A = torch.empty((len(chunk), R, n), dtype=dtype, device=device)
        B = torch.empty((len(chunk), m, R), dtype=dtype, device=device)
    for g, path_terms in enumerate(chunk):
        offset = 0
        for (_, module, weight), r in zip(path_terms, ranks):
            A[g, offset : offset + r].copy_(module.A)
            block = B[g, :, offset : offset + r].copy_(module.B)
            if weighted:
                block.mul_(weight)
            offset += r
    return A, B
