"""The streamed full-checkpoint merge, one tensor at a time: the base tensor W_0 and each input's task vector
tau_k = W_k - W_0 (a LoRA's s B A in W_0's layout) are read, their inner products <tau_i, tau_j> accumulated
in float64, and the merged tensor W_0 + rule(c, tau) written in the base's shard layout and dtype. Memory stays
about K + 2 tensors in float32, whatever the size of the model.

Conventions, per tensor (mergekit 0.1.5 merge_methods/generalized_task_arithmetic.py, merge_group: every
tensor, 1-D norms and biases and embeddings alike, gets the same rule on its task vectors):
- the entry-wise rules (task_arithmetic, ties, dare_*, magnitude_prune) act on every tensor as on any update
  (nan_peft.rules, the same functions as for adapters); one difference from mergekit, tested in
  tests/test_mergekit_oracle.py: the magnitude trim keeps int(density * numel) entries, as TIES's paper and peft
  do, where mergekit (sparsify.py, magnitude) keeps at least one;
- the spectral rules (iso_c, iso_cts, tsv, wudi, knots_*, svc) act on 2-D tensors, embeddings included (a conv
  weight as (out, in * kernel)); a 1-D tensor has no singular vectors, so it gets task arithmetic's
  scale * sum_k c_k tau_k, as Iso-C's reference code does (danielm1405/iso-merging src/utils/iso.py, iso_c and
  iso_cts: 2-D task vectors merged spectrally, the others averaged);
- vocabulary rows (--vocab): with "base" an input's rows past the base's are left out; with "union" a row past
  the base's takes the mean of the inputs that have it as its W_0 and each of those inputs its difference from
  it, the others contributing nothing (mergekit tokenizer/embed.py, assign_embedding_sources: a token of one model
  takes that model's embedding, of several their average). Token ids are taken to mean the same in every input
  up to its size (tokens added at the end, as resize_token_embeddings does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch

from ..errors import NanPeftError
from ..fold.checkpoint import FLOATS, ITEMSIZE, TensorReader, copy_range, encode_header, numel, write_all, write_model_files
from ..rules import RULES, in_core_space, module_generator
from .inputs import FullPlan, rows

GRAM_COLUMNS = 1 << 14
"""Entries per input in each float32 piece of the inner products (inner_products)."""


class Readers:
    """One TensorReader per checkpoint of the plan (the base's and each full input's), closed together."""

    def __init__(self, plan: FullPlan) -> None:
        self.plan, self._stack = plan, ExitStack()
        self.base = self._stack.enter_context(TensorReader(plan.base))
        self.inputs = [self._stack.enter_context(TensorReader(s.checkpoint)) if s.checkpoint is not None else None for s in plan.sources]

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def task_vectors(plan: FullPlan, readers: Readers, name: str, device) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """(W_0, members, taus) of tensor `name` in float32 on `device`: W_0 in the output's shape, and the stacked
    task vectors (P, *shape) of the inputs `members` (indices into plan.sources) that have one there."""
    weight = readers.base.read(name).to(device, torch.float32)
    shape = plan.shapes[name]
    counts = rows(plan, name) if weight.dim() else []
    if shape != tuple(weight.shape):  # vocab union: rows past the base's start from the mean of the inputs that have them
        grown = weight.new_zeros(shape)
        grown[: weight.shape[0]] = weight
        weight, have = grown, weight.new_zeros(shape[0])
        for k, reader in enumerate(readers.inputs):
            if reader is not None and counts[k] > plan.base.tensors[name].shape[0]:
                extra = reader.read(name)[plan.base.tensors[name].shape[0] :].to(device, torch.float32)
                weight[plan.base.tensors[name].shape[0] : counts[k]] += extra
                have[plan.base.tensors[name].shape[0] : counts[k]] += 1
        tail = slice(plan.base.tensors[name].shape[0], None)
        weight[tail] /= have[tail].clamp_min(1).reshape(-1, *([1] * (weight.dim() - 1)))
    members = [k for k, source in enumerate(plan.sources) if source.has(name)]
    short = any(c < shape[0] for c in counts)  # rows an input lacks (vocab): their task vector is zero
    taus = weight.new_zeros((len(members), *shape)) if short else weight.new_empty((len(members), *shape))
    for slot, k in enumerate(members):
        source = plan.sources[k]
        if source.checkpoint is None:
            module = source.modules[name]
            update = module.scale * (module.B.to(device, torch.float32) @ module.A.to(device, torch.float32))
            taus[slot] = module.weight_delta(update.reshape(module.B.shape[0], -1))
            continue
        tuned = readers.inputs[k].read(name)
        count = min(counts[k], shape[0]) if counts else None
        rows_read = slice(None) if count is None else slice(0, count)  # in place: no temporary of the tensor's size
        taus[slot, rows_read].copy_(tuned[rows_read]).sub_(weight[rows_read])  # (a mixed-dtype torch.sub is 3x slower)
    return weight, members, taus


def inner_products(taus: torch.Tensor) -> torch.Tensor:
    """(P, P) float64 on the CPU: <tau_i, tau_j>, as float32 products summed over pieces of GRAM_COLUMNS entries
    (one small GEMM each) and the pieces' sums added in float64. The error stays near float32's rounding of one
    piece, about 1e-8 of ||tau_i|| ||tau_j|| (where a float32 sum over a billion entries would lose about 1e-4),
    at the cost of one pass over the task vectors (converting them to float64 first costs two more and, on a CPU,
    is five to ten times slower)."""
    flat = taus.reshape(taus.shape[0], -1)
    gram = torch.zeros((flat.shape[0], flat.shape[0]), dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], GRAM_COLUMNS):
        piece = flat[:, start : start + GRAM_COLUMNS]
        gram += piece @ piece.T
    return gram.cpu()


def merged_update(taus: torch.Tensor, weights: torch.Tensor, name: str, rule: str, given: dict, seed: int | None) -> torch.Tensor:
    """The rule's merged update of one tensor from its task vectors and coefficients (inputs with c_k = 0 left
    out), under the conventions of the module docstring. taus may be overwritten."""
    keep = weights != 0
    if not keep.all():  # (indexing copies the stack: only when some input drops out)
        taus, weights = taus[keep.to(taus.device)], weights[keep]
    weights = weights.to(taus.device, taus.dtype)
    if taus.shape[0] == 0:
        return torch.zeros(taus.shape[1:], dtype=taus.dtype, device=taus.device)
    if in_core_space(rule, given) and taus.dim() != 3:
        if taus.dim() == 2:  # a 1-D tensor: task arithmetic
            return merged_update(taus, weights, name, "task_arithmetic", {"scale": given.get("scale", 1.0)}, None)
        return merged_update(taus.reshape(*taus.shape[:2], -1), weights, name, rule, given, seed).reshape(taus.shape[1:])
    if rule == "task_arithmetic" and not given.get("calibrate"):  # scale * sum_k c_k tau_k accumulated: no K-sized temporary
        c = weights.tolist()  # Python floats: a float64 tensor times a float32 one takes torch's slow mixed-dtype path
        update = taus[0].mul_(c[0])  # in place: the caller is done with the task vectors
        for tau, ck in zip(taus[1:], c[1:]):
            update.add_(tau, alpha=ck)
        return update if given.get("scale", 1.0) == 1 else update.mul_(given["scale"])
    generator = module_generator(seed, name) if seed is not None else None
    return RULES[rule](taus, weights, generator, **given)


def each_tensor(plan: FullPlan, device) -> Iterator[tuple[str, torch.Tensor, list[int], torch.Tensor]]:
    """(name, W_0, members, taus) of every float tensor of the base, in its shards' order."""
    with Readers(plan) as readers:
        for name in plan.tensors:
            weight, members, taus = task_vectors(plan, readers, name, device)
            yield name, weight, members, taus
            del weight, taus  # before the next tensor is read


def check_finite(gram: torch.Tensor, plan: FullPlan, name: str, members: list[int]) -> None:
    bad = ~torch.isfinite(gram.diagonal())
    if bad.any():
        source = plan.sources[members[int(bad.nonzero()[0])]]
        raise NanPeftError(f"{source.path}: tensor {name} holds NaN or Inf (or its task vector overflows): refusing to merge it")


def write_checkpoint(plan: FullPlan, merged: Callable[[str], torch.Tensor], tmp: Path) -> None:
    """The base's shards, tensor names and dtypes with each float tensor `merged(name)` (in the base's order, so
    that merged is called once per tensor, in plan.tensors order); other tensors copied byte for byte; the index
    and config.json."""
    base = plan.base
    total = 0
    for file in base.files:
        names = sorted((n for n, e in base.tensors.items() if e.file == file), key=lambda n: base.tensors[n].begin)
        header, offset = encode_header([(name, base.tensors[name].dtype, plan.shapes[name], _stored_bytes(plan, name)) for name in names],
                                       base.file_metadata[file])
        with open(base.folder / file, "rb", buffering=0) as source, open(tmp / file, "wb", buffering=0) as out:
            write_all(out.fileno(), header)
            for name in names:
                entry = base.tensors[name]
                if entry.dtype not in FLOATS:
                    copy_range(source.fileno(), out.fileno(), entry.begin, entry.end - entry.begin, base.folder / file)
                    continue
                tensor = merged(name).to(FLOATS[entry.dtype]).cpu().contiguous()
                write_all(out.fileno(), tensor.reshape(-1).view(torch.uint8).numpy().data)
                del tensor  # before the next one is computed
        total += offset
    metadata = {**base.index_metadata, "total_size": total} if base.sharded else None
    write_model_files(tmp, plan.config, metadata, {name: entry.file for name, entry in base.tensors.items()})


def _stored_bytes(plan: FullPlan, name: str) -> int:
    """Bytes of tensor `name` in the output: its output shape in the base's dtype (a non-float tensor: as stored)."""
    entry = plan.base.tensors[name]
    return numel(plan.shapes[name]) * ITEMSIZE[entry.dtype] if entry.dtype in FLOATS else entry.end - entry.begin
