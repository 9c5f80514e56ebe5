"""The streaming fold: shard by shard, tensor by tensor. Untouched tensors are copied byte for byte; a touched
one is read, added to (float32 on the compute device, one cast back to its dtype) and written. A plain weighted
sum (task arithmetic) is added from its factors a block of rows at a time; the entry-wise rules need each whole
update. Memory stays about one tensor plus its update."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..combination import dense_updates, stacked_factors, weighted_terms
from ..errors import NanPeftError
from ..lora import LoraModule
from ..rules import LOW_RANK
from .checkpoint import FLOATS, ITEMSIZE, StoredTensor, copy_range, encode_header, flush, numel, write_model_files, read_into, read_tensor, write_all
from .plan import FoldPlan

if TYPE_CHECKING:
    from ..merge import MergeResult


def folded_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(W.float() + delta.float()).to(W.dtype) on delta's device, delta in W's layout (LoraModule.weight_delta).
    A float32 delta is added to in place (its memory is reused); pass a copy to keep it."""
    folded = delta if delta.dtype == torch.float32 else delta.float()
    folded += weight.to(folded.device)
    return folded.to(weight.dtype)


def float_delta(plan: FoldPlan, result: MergeResult, path: str, rule: str, options: Mapping, device) -> torch.Tensor:
    """The module's update in its weight's layout, computed in float32."""
    return plan.modules[path].weight_delta(module_update(result, path, rule, options, device, torch.float32))


def module_update(
    result: MergeResult, path: str, rule: str, options: Mapping, device: torch.device | str, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The merged (m, n) update of one module in `dtype` on `device` (dense_updates restricted to that module)."""
    coefficients = result.coefficients
    m = coefficients.modules.index(path)
    only = replace(coefficients, modules=(path,), values=coefficients.values[m : m + 1])
    for _, _, update in dense_updates(result.sources, only, rule, options, device, dtype):
        return update
    raise NanPeftError(f"module {path}: the merge has no update there")  # every coefficient zero: planned out before


def write_streaming(plan: FoldPlan, result: MergeResult, rule: str, options: Mapping, device, tmp: Path) -> None:
    checkpoint = plan.checkpoint
    weight_map, total_size = {}, 0
    # Each written shard is flushed to disk in the background while the next one is computed, so that the
    # publish's final fsync (writer.publish_folder) finds little left to write.
    with ThreadPoolExecutor(max_workers=1) as flusher:
        flushed = []
        for file, names in plan.layout.items():
            total_size += _write_shard(plan, file, names, result, rule, options, device, tmp / file)
            weight_map.update(dict.fromkeys(names, file))
            flushed.append(flusher.submit(flush, tmp / file))
        for done in flushed:
            done.result()
    metadata = None
    if checkpoint.sharded:
        metadata = dict(checkpoint.index_metadata)
        metadata["total_size"] = total_size
        if "total_parameters" in metadata:
            split = [source for names in plan.layout.values() for name, source in names.items() if name != source]
            metadata["total_parameters"] += sum(numel(checkpoint.tensors[source].shape) for source in split)
    write_model_files(tmp, plan.config, metadata, weight_map)


def _write_shard(plan, file, names, result, rule, options, device, target: Path) -> int:
    """Write one output shard: the header, then each tensor copied or folded. Returns the bytes of tensor data."""
    checkpoint = plan.checkpoint
    stored = {name: checkpoint.tensors[source] for name, source in names.items()}
    order = sorted(names, key=lambda name: (-ITEMSIZE.get(stored[name].dtype, 1), name))  # aligned, as safetensors does
    header, offset = encode_header([(name, stored[name].dtype, stored[name].shape, stored[name].end - stored[name].begin) for name in order],
                                   checkpoint.file_metadata[file])
    buffers = _Buffers(device)
    with open(checkpoint.folder / file, "rb", buffering=0) as source, open(target, "wb", buffering=0) as out:
        write_all(out.fileno(), header)
        for name in order:
            entry = stored[name]
            if name not in plan.targets:
                copy_range(source.fileno(), out.fileno(), entry.begin, entry.end - entry.begin, checkpoint.folder / file)
                continue
            path = plan.targets[name]
            if rule in LOW_RANK:  # a plain weighted sum: added from the factors, a block of rows at a time
                factors = row_factors(result, path, plan.modules[path], options, device)
                _write_folded_rows(source.fileno(), out.fileno(), entry, factors, buffers, checkpoint.folder / file)
                continue
            delta = float_delta(plan, result, path, rule, options, device)
            folded = folded_weight(read_tensor(source.fileno(), entry, checkpoint.folder / file), delta).cpu().contiguous()
            del delta
            write_all(out.fileno(), folded.reshape(-1).view(torch.uint8).numpy().data)
    return offset


# Rows of a weight folded at a time by the low-rank path: the read, float32 and written pieces stay in cache.
FOLD_CHUNK_BYTES = 4 * 2**20


class _Buffers:
    """Reusable pieces for _write_folded_rows (fresh memory costs page faults, reused memory does not)."""

    def __init__(self, device) -> None:
        self.device = torch.device(device)
        self.raw = torch.empty(FOLD_CHUNK_BYTES, dtype=torch.uint8)
        self.work = torch.empty(FOLD_CHUNK_BYTES // 4, dtype=torch.float32, device=self.device)

    def fit(self, elements: int) -> None:
        """Grow the buffers to hold `elements` float32 values (a row longer than FOLD_CHUNK_BYTES)."""
        if self.work.numel() < elements:
            self.raw = torch.empty(elements * 8, dtype=torch.uint8)
            self.work = torch.empty(elements, dtype=torch.float32, device=self.device)


def row_factors(result: MergeResult, path: str, module: LoraModule, options: Mapping, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) in float32 on `device` with left @ right = the module's merged task-arithmetic update in its
    weight's layout, flattened to (rows, columns): (B, A) of the cat form, or (A^T, B^T) where the weight is the
    transposed update (Conv1D, embedding)."""
    coefficients = result.coefficients
    m = coefficients.modules.index(path)
    only = replace(coefficients, modules=(path,), values=coefficients.values[m : m + 1])
    terms = weighted_terms(result.sources, only, options.get("scale", 1.0))[path]
    B, A = stacked_factors(terms, device, torch.float32)  # as dense_updates(..., dtype=torch.float32) does
    if module.transposed:
        return A.T.contiguous(), B.T.contiguous()
    return B, A


def _write_folded_rows(source: int, out: int, entry: StoredTensor, factors, buffers: _Buffers, path: Path) -> None:
    """Write (W + left @ right).to(W.dtype) a block of rows at a time: each block is read into a reusable buffer,
    widened to float32, added to with one matrix product (addmm: the float32 update is never whole in memory),
    narrowed back and written. The result is folded_weight's, row block by row block, up to float32 rounding
    (the product is accumulated onto W instead of rounded first: an occasional last-bit difference in W.dtype)."""
    left, right = factors
    rows, columns = entry.shape[0], numel(entry.shape[1:])
    dtype, itemsize = FLOATS[entry.dtype], ITEMSIZE[entry.dtype]
    step = max(1, min(rows, FOLD_CHUNK_BYTES // (columns * max(itemsize, 4))))
    buffers.fit(step * columns)
    for begin in range(0, rows, step):
        count = min(step, rows - begin)
        raw = buffers.raw[: count * columns * itemsize]
        read_into(source, raw, entry.begin + begin * columns * itemsize, path)
        weight = raw.view(dtype).view(count, columns)
        work = buffers.work[: count * columns].view(count, columns)
        if dtype == torch.float32 and buffers.device.type == "cpu":
            work = weight  # add in place
        else:
            work.copy_(weight)
        work.addmm_(left[begin : begin + count], right)
        if work.data_ptr() != weight.data_ptr():
            weight.copy_(work)
        write_all(out, raw.numpy().data)
