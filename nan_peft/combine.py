"""Combine weighted LoRA updates into one LoRA module per path: exactly (cat) or truncated (svd)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batching import DEFAULT_BATCH_BYTES, Term, batches
from .coefficients import Coefficients
from .errors import NanPeftError
from .gram import pad_rank, tail_energy, truncate_low_rank
from .lora import LoraAdapter, LoraModule
from .norms import UpdateGram

COMBINES = ("cat", "svd")


@dataclass(frozen=True)
class ModuleReport:
    """What the merge did at one module: the exact merged update's norm and what truncation discarded."""

    module: str
    input_rank: int
    rank: int
    norm: float
    discarded: float

    @property
    def relative_discarded(self) -> float:
        """||dW - dW_r||_F / ||dW||_F (0 for an exact merge or an empty update)."""
        return self.discarded / self.norm if self.norm > 0 else 0.0


def weighted_terms(adapters: Sequence[LoraAdapter], coefficients: Coefficients) -> dict[str, list[Term]]:
    """Per module path, the terms (k, module, c_k * s_k) of the adapters with a non-zero coefficient there."""
    terms = {}
    for m, path in enumerate(coefficients.modules):
        c = coefficients.values[m].tolist()
        terms[path] = [(k, a.modules[path], c[k] * a.modules[path].scale) for k, a in enumerate(adapters) if path in a.modules and c[k] != 0]
    return terms


def combine(
    adapters: Sequence[LoraAdapter],
    coefficients: Coefficients,
    gram: UpdateGram,
    method: str = "cat",
    rank: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> tuple[dict[str, LoraModule], list[ModuleReport]]:
    """Merge sum_k c_k s_k B_k A_k at every module into factors (B, A) with scale 1.

    "cat" stacks the factors, [c_1 s_1 B_1 | ... | c_K s_K B_K] @ [A_1; ...; A_K]: exact, rank sum_k r_k.
    "svd" keeps the best rank-`rank` approximation of that product (gram.truncate_low_rank), computed in
    float64 on `device` from QR factors, never the dense matrix; the discarded norm is reported.
    Modules where every coefficient is 0 are left out (their update is zero).
    """
    if method not in COMBINES:
        raise NanPeftError(f"unknown combine {method!r}; choose from {', '.join(COMBINES)}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise NanPeftError(f"rank must be a positive integer, got {rank!r}")
    if method == "svd" and rank is None:
        raise NanPeftError("svd needs a target rank (rank= / --rank)")
    terms = {path: t for path, t in weighted_terms(adapters, coefficients).items() if t}
    norms = dict(zip(gram.modules, gram.merged_norms(coefficients.values).tolist()))
    if method == "cat":
        return _cat(terms, norms, rank, dtype)
    return _svd(terms, rank, device, dtype, max_batch_bytes)


def _cat(terms, norms, rank, dtype):
    input_ranks = {path: sum(m.rank for _, m, _ in t) for path, t in terms.items()}
    needed = max(input_ranks.values(), default=0)
    if rank is not None and rank < needed:
        raise NanPeftError(f"cat is exact and needs rank >= {needed} (the sum of the ranks); use svd to truncate to {rank}")
    rank = rank or needed
    merged, report = {}, []
    for path, path_terms in terms.items():
        A = torch.cat([m.A.to(torch.float64) for _, m, _ in path_terms])
        B = torch.cat([m.B.to(torch.float64) * w for _, m, w in path_terms], dim=1)
        B, A = pad_rank(B, A, rank)
        merged[path] = _like(path_terms[0][1], A.to(dtype), B.to(dtype))
        report.append(ModuleReport(path, input_ranks[path], input_ranks[path], norms[path], 0.0))
    return merged, report


def _svd(terms, rank, device, dtype, max_batch_bytes):
    merged, report = {}, {}
    for batch in batches(terms, device, torch.float64, max_batch_bytes):
        B, A, S = truncate_low_rank(batch.B, batch.A, rank)
        B, A, S = B.to("cpu", dtype), A.to("cpu", dtype), S.cpu()
        norms, discarded = S.square().sum(-1).sqrt().tolist(), tail_energy(S, rank).tolist()
        kept = (S[:, :rank] > 0).sum(-1).tolist()
        for g, path in enumerate(batch.paths):
            merged[path] = _like(terms[path][0][1], A[g], B[g])
            report[path] = ModuleReport(path, sum(batch.ranks), kept[g], norms[g], discarded[g])
    paths = sorted(merged)
    return {p: merged[p] for p in paths}, [report[p] for p in paths]


def _like(template: LoraModule, A: torch.Tensor, B: torch.Tensor) -> LoraModule:
    return LoraModule(A.contiguous(), B.contiguous(), 1.0, template.kind, template.a_tail, template.b_tail, template.fan_in_fan_out)
