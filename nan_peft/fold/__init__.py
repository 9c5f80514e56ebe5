"""Fold a merged update into a base model: W' = W + sum_k c_k dW_k in every adapted module, written as a plain
transformers model (safetensors shards, index, config and tokenizer files).

Two paths, one plan. The plan (`plan_fold`) reads only headers and config: which checkpoint tensor each adapted
module updates, their shapes, the tied weights that must be written apart. Then either
- streaming (default): shard by shard, tensor by tensor. Untouched tensors are copied byte for byte; a touched
  one is read, added to (float32 on `device`, one cast back to its dtype) and written. A plain weighted sum
  (task arithmetic) is added from its factors a block of rows at a time (W_rows += B_rows @ A, one addmm in
  reused, cache-sized buffers); the entry-wise rules need each whole update. Memory stays about one tensor
  plus its update at most, so a model larger than RAM folds on a small machine;
- placement (`device_map`): the model is loaded with transformers and accelerate over the GPUs and the CPU,
  each update is added on the device that holds its weight, and the model is saved. Disk offload is refused.

The update added is the exact merged update of the rule the merge used (combine.dense_updates): a truncated
(svd) merged adapter is an approximation of it, the fold never truncates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..devices import resolve_device
from ..errors import NanPeftError
from ..publish import check_file_names, check_output, publish_folder, write_files
from .checkpoint import MODEL_CONFIG_NAME, INDEX_NAME, copy_other_files, read_checkpoint, read_header, resolve_base
from .placed import fold_placed, load_placed, save_placed
from .plan import FoldPlan, plan_fold, resolve_tensor
from .stream import module_update, row_factors, write_streaming

if TYPE_CHECKING:
    from ..merge import MergeResult

__all__ = ["FoldPlan", "fold_into", "merge_rule", "module_update", "parse_max_memory", "plan_fold", "read_checkpoint",
           "read_header", "resolve_base", "resolve_tensor", "row_factors"]



def fold_into(
    result: MergeResult,
    base: str | os.PathLike,
    output: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    device_map: str | Mapping | None = None,
    max_memory: Mapping | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write base + the merged update of `result` as a full model to `output` (atomically); return `output`.

    base: a folder (or Hub id) holding a transformers model in safetensors (model.safetensors, or shards and
    model.safetensors.index.json). Each adapted module's weight becomes (W.float() + update.float()).to(W.dtype)
    with the exact merged update of result's rule and coefficients (never truncated); every other tensor, file
    and the shard layout are copied unchanged. When the adapters change a weight the model ties to another one
    (a LoRA on tied input embeddings), both are written and config.json gets tie_word_embeddings false: that is
    what the adapter does in peft before merging.

    device_map None streams shard by shard, computing updates on `device` ("cpu", "cuda", "cuda:1", "auto").
    Otherwise ("auto", "balanced", "balanced_low_0", "sequential", "cpu" or a dict, with `max_memory` as in
    transformers, e.g. {0: "20GiB", "cpu": "64GiB"}) the model is loaded with accelerate and each update is
    computed and added on the GPU that holds its weight (on `device` for weights held or offloaded on the CPU);
    disk offload is refused.
    extra_files: {name: content} written into the output too (a model card, a merge record).
    """
    output = check_output(output, overwrite)
    carried = sorted({m for source in result.sources for m in source.saved_modules})
    if carried:
        raise NanPeftError(f"the adapters carry full modules ({', '.join(carried)}: modules_to_save); folding them is not supported")
    folder = resolve_base(base)
    if output.resolve() == folder.resolve():
        raise NanPeftError(f"{output} is the base model's folder: fold into a new folder")
    compute = resolve_device(device)
    plan = plan_fold(result, folder)
    rule, options = merge_rule(result)
    if device_map is None:

        def write_weights(tmp: Path) -> None:
            write_streaming(plan, result, rule, options, compute, tmp)

    else:
        model = load_placed(plan, device_map, max_memory)
        fold_placed(model, plan, result, rule, options, compute)

        def write_weights(tmp: Path) -> None:
            save_placed(model, plan, tmp)

    check_file_names(extra_files or {}, reserved=(*plan.checkpoint.files, MODEL_CONFIG_NAME, INDEX_NAME))

    def write_all(tmp: Path) -> None:
        write_weights(tmp)
        copy_other_files(plan.checkpoint.folder, tmp)
        write_files(tmp, extra_files or {})

    protected = [folder, *(source.source for source in result.sources if source.source)]
    return publish_folder(output, write_all, overwrite, protected)


def merge_rule(result: MergeResult) -> tuple[str, dict]:
    """The merge rule of `result` and its options, as dense_updates takes them: from the spec it was made with."""
    return result.spec.method, result.spec.rule_given


def parse_max_memory(text: str) -> dict[int | str, str]:
    """"0=20GiB,1=20GiB,cpu=64GiB" -> {0: "20GiB", 1: "20GiB", "cpu": "64GiB"} (the --max-memory syntax)."""
    limits: dict[int | str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, amount = part.partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not amount:
            raise NanPeftError(f"--max-memory: expected DEVICE=AMOUNT (e.g. 0=20GiB,cpu=64GiB), got {part!r}")
        limits[int(device) if device.isdigit() else device] = amount
    if not limits:
        raise NanPeftError("--max-memory: no limits given")
    return limits
