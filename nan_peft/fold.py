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

import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .combine import dense_updates, stacked_factors, weighted_terms
from .errors import NanPeftError
from .lora import KEY_PREFIX, LoraModule
from .reader import resolve_folder
from .rules import LOW_RANK
from .writer import check_file_names, check_output, publish_folder, write_files

if TYPE_CHECKING:
    from .merge import MergeResult

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
RULE_OPTIONS = ("density", "scale", "normalize", "seed", "majority_sign_method")
_CARRIED_SUFFIX = ".base_layer.weight"
# Files that hold weights (in any format): never copied into the output, where they would be stale.
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)(\.index\.json)?$")
# Bytes per element of the safetensors dtypes; a folded weight must be one of FLOATS.
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, from its header: where its bytes lie (absolute file offsets)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Checkpoint:
    """A base model's safetensors weights: one file, or shards listed by an index."""

    folder: Path
    files: list[str]
    tensors: dict[str, StoredTensor]
    file_metadata: dict[str, dict[str, str]]
    index_metadata: dict | None = None
    """The index's "metadata" (None for a single-file model)."""

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None


@dataclass
class FoldPlan:
    """What a fold writes: every output tensor by file, the module whose update it receives, and the config."""

    checkpoint: Checkpoint
    config: dict
    """config.json of the output (the base's, with tie_word_embeddings false where tied weights were split)."""
    layout: dict[str, dict[str, str]]
    """file -> {output tensor name: stored tensor it starts from}; a split tied weight starts from its twin."""
    targets: dict[str, str] = field(default_factory=dict)
    """output tensor name -> adapted module path whose merged update it receives."""
    modules: dict[str, LoraModule] = field(default_factory=dict)
    """module path -> one source module (its layout and shape)."""
    untied: list[tuple[str, ...]] = field(default_factory=list)
    """Tied weights the fold writes apart, because the adapters change only some of them (names in the model)."""
    loaded: dict[str, str] = field(default_factory=dict)
    """checkpoint key -> the parameter name transformers loads it as, where the two differ (a legacy layout)."""

    @property
    def sources(self) -> dict[str, str]:
        """output tensor name -> the stored tensor it starts from."""
        return {name: source for names in self.layout.values() for name, source in names.items()}


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
    from .merge import resolve_device  # here: merge may import this module for MergeResult.fold_into

    compute = resolve_device(device)
    plan = plan_fold(result, folder)
    rule, options = merge_rule(result)
    if device_map is None:

        def write_weights(tmp: Path) -> None:
            _write_streaming(plan, result, rule, options, compute, tmp)

    else:
        model = _load_placed(plan, device_map, max_memory)
        _fold_placed(model, plan, result, rule, options, compute)

        def write_weights(tmp: Path) -> None:
            _save_placed(model, plan, tmp)

    check_file_names(extra_files or {}, reserved=(*plan.checkpoint.files, "config.json", "model.safetensors.index.json"))

    def write_all(tmp: Path) -> None:
        write_weights(tmp)
        _copy_other_files(plan, tmp)
        write_files(tmp, extra_files or {})

    protected = [folder, *(source.source for source in result.sources if source.source)]
    return publish_folder(output, write_all, overwrite, protected)


def merge_rule(result: MergeResult) -> tuple[str, dict]:
    """The merge rule of `result` and its options, as dense_updates takes them."""
    options = result.options or {}
    return options.get("method", "task_arithmetic"), {key: options[key] for key in RULE_OPTIONS if options.get(key) is not None}


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


# ----------------------------------------------------------------------------------------------------------
# Reading the base model: headers and config only


def resolve_base(base: str | os.PathLike) -> Path:
    """The base model's folder: a local folder, or a Hub id fetched (weights in safetensors only)."""
    return resolve_folder(
        base,
        f"the base model is a folder holding {CONFIG_NAME} and safetensors weights",
        ignore_patterns=["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "original/*"],
    )


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Headers of a base model's safetensors weights; refuse missing shards, bad headers and .bin-only models."""
    folder = Path(folder)
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        index = _read_json(index_file, f"{folder.name}/{INDEX_NAME}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise NanPeftError(f"{folder}: {INDEX_NAME} has no weight_map of tensor names to shard files")
        files = list(dict.fromkeys(weight_map.values()))
        index_metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    elif (folder / WEIGHTS_NAME).is_file():
        weight_map, files, index_metadata = None, [WEIGHTS_NAME], None
    else:
        others = sorted(p.name for p in folder.glob("*") if _WEIGHT_FILE.fullmatch(p.name))
        found = f" (found {', '.join(others[:3])})" if others else ""
        raise NanPeftError(
            f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{found}; folding needs safetensors weights "
            "(convert a .bin model with transformers: from_pretrained(...).save_pretrained(..., safe_serialization=True))"
        )
    tensors, file_metadata = {}, {}
    for file in files:
        path = folder / file
        if Path(file).name != file:
            raise NanPeftError(f"{folder}: {INDEX_NAME} lists shard {file!r}, which is not a file name in the folder")
        if not path.is_file():
            raise NanPeftError(f"{folder}: shard {file} listed in {INDEX_NAME} is missing")
        metadata, entries = read_header(path)
        file_metadata[file] = metadata
        for name, entry in entries.items():
            if name in tensors:
                raise NanPeftError(f"{folder}: tensor {name} is stored in both {tensors[name].file} and {file}")
            tensors[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if tensors.get(name) is None or tensors[name].file != file:
                raise NanPeftError(f"{folder}: {INDEX_NAME} lists {name} in {file}, but that shard does not hold it")
    return Checkpoint(folder, files, tensors, file_metadata, index_metadata)


def read_header(path: Path) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """The metadata and tensor entries of a safetensors file, checked against its size."""
    label = f"{path.parent.name}/{path.name}"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise NanPeftError(f"{label}: not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise NanPeftError(f"{label}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise NanPeftError(f"{label}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NanPeftError(f"{label}: not a safetensors file (__metadata__ is not a map of strings)")
    start, entries, spans = 8 + length, {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            valid = False
        numel = 1
        for d in shape if valid else ():
            numel *= d
        if not valid or start + end > size or (dtype in _ITEMSIZE and end - begin != numel * _ITEMSIZE[dtype]):
            raise NanPeftError(f"{label}: tensor {name} has a bad header entry or lies past the end of the file (truncated?)")
        entries[name] = StoredTensor(path.name, dtype, shape, start + begin, start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise NanPeftError(f"{label}: tensors {first} and {second} overlap")
    return metadata, entries


@dataclass(frozen=True)
class Architecture:
    """What the model class that config.json names says about its weights, beyond the checkpoint's headers."""

    tied: list[tuple[str, ...]]
    """Groups of parameter names that share one tensor."""
    transposed: frozenset[str]
    """Weights stored (in, out): transformers' Conv1D (GPT-2 style). peft decides fan_in_fan_out by this layer
    type, whatever the saved config says (a config may say false for an adapter that also targets lm_head)."""
    rename: Callable[[str], str | None] = lambda key: key
    """The name transformers gives a checkpoint key on loading (Llava's language_model.model.* loads as
    model.language_model.*, where peft's module paths point); None for a key it converts, not just renames."""


def architecture(config: dict) -> Architecture | None:
    """The model config.json describes, built on the meta device (no memory); None when transformers cannot
    build that architecture."""
    import transformers
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        return None
    try:
        config_object = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = model_class(config_object)
    except Exception:  # an architecture this transformers cannot build: tying unknown, the caller decides
        return None
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    transposed = frozenset(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D))
    return Architecture([tuple(names) for names in groups.values() if len(names) > 1], transposed, _loading_renames(model))


def _loading_renames(model) -> Callable[[str], str | None]:
    """transformers' renaming of checkpoint keys on loading (identity where this transformers has none)."""
    try:  # transformers 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def rename(key: str) -> str | None:
            new, converter = rename_source_key(key, renamings, converters)
            return None if converter is not None else new

        return rename
    except Exception:  # transformers 4: a regex mapping on the class; the first pattern that matches renames
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}

        def rename(key: str) -> str | None:
            for pattern, replacement in mapping.items():
                new, count = re.subn(pattern, replacement, key)
                if count:
                    return new
            return key

        return rename


def tied_groups(config: dict) -> list[tuple[str, ...]] | None:
    """Groups of parameter names that share one tensor in the model config.json describes (see architecture)."""
    found = architecture(config)
    return None if found is None else found.tied


def resolve_tensor(module: str, names, what: str = "weight") -> str:
    """The tensor holding `module`'s weight: module + ".weight" itself, else the one name that is a dotted
    suffix of it (a checkpoint saved from a bare base class, e.g. GPT2Model) or ends with it (a wrapper)."""
    key = f"{module}.{what}"
    if key in names:
        return key
    matches = sorted(n for n in names if n.endswith("." + key) or key.endswith("." + n))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NanPeftError(f"the base model has no tensor for module {module} (no {key}): the adapters were trained on another model")
    raise NanPeftError(f"module {module} matches several base tensors ({', '.join(matches[:4])}): cannot tell which one it adapts")


def plan_fold(result: MergeResult, base: str | os.PathLike) -> FoldPlan:
    """Check that `result` fits the base model and decide every tensor written, before anything is written."""
    folder = resolve_base(base)
    checkpoint = read_checkpoint(folder)
    config = _read_json(folder / CONFIG_NAME, f"{folder.name}/{CONFIG_NAME}") if (folder / CONFIG_NAME).is_file() else None
    if not isinstance(config, dict):
        raise NanPeftError(f"{folder}: missing or invalid {CONFIG_NAME}")
    built = architecture(config)
    groups = None if built is None else built.tied
    # Planned in the names the model class gives the tensors (where peft's module paths point), written in the
    # checkpoint's own.
    stored_as = _stored_as(checkpoint, built)
    tensors = {name: checkpoint.tensors[key] for name, key in stored_as.items()}
    aliases = {}  # a tied name the checkpoint does not store -> the stored twin it loads from
    for group in groups or []:
        stored = [name for name in group if name in tensors]
        aliases.update({name: stored[0] for name in group if stored and name not in tensors})
    names = set(tensors) | set(aliases)

    modules, targets = {}, {}
    rule_modules = {path for path, row in zip(result.coefficients.modules, result.coefficients.values) if bool((row != 0).any())}
    for path in sorted(rule_modules):
        module = next(a.modules[path] for a in result.sources if path in a.modules)
        name = resolve_tensor(path, names)
        if name in targets:
            raise NanPeftError(f"modules {targets[name]} and {path} both resolve to the base tensor {name}")
        stored = tensors[aliases.get(name, name)]
        module = _laid_out(module, name, stored.shape, built)
        expected = tuple(module.weight_delta(torch.empty(module.B.shape[0], module.A.shape[1], device="meta")).shape)
        if stored.shape != expected:
            raise NanPeftError(
                f"module {path}: the base tensor {name} has shape {_shape(stored.shape)} but the adapters' update is "
                f"{_shape(expected)}: the adapters were trained on another model"
            )
        if stored.dtype not in FLOATS:
            raise NanPeftError(
                f"module {path}: the base tensor {name} is {stored.dtype}, not a float (a quantized model?); fold into an unquantized base"
            )
        modules[path], targets[name] = module, path
    if groups is None and config.get("tie_word_embeddings", True):
        embedding = [path for path, module in modules.items() if module.kind == "embedding"]
        if embedding:
            raise NanPeftError(
                f"cannot tell whether {config.get('architectures')} ties its embedding {embedding[0]} to the output layer "
                "(transformers cannot build this architecture): refusing to fold an embedding update into it"
            )
    _check_carried(result, checkpoint, names, {name: stored_as[aliases.get(name, name)] for name in names})

    layout = {file: {} for file in checkpoint.files}
    for name, stored in checkpoint.tensors.items():
        layout[stored.file][name] = name
    untied = []
    for group in groups or []:
        if not any(name in targets for name in group) or not any(name in tensors for name in group):
            continue
        untied.append(group)
        for name in group:
            if name not in tensors:
                layout[tensors[aliases[name]].file][name] = stored_as[aliases[name]]
    if untied:
        config = _untie(config, untied, targets)
    written = {stored_as.get(name, name): path for name, path in targets.items()}
    loaded = {key: name for name, key in stored_as.items() if key != name}
    return FoldPlan(checkpoint, config, layout, written, modules, untied, loaded)


def _stored_as(checkpoint: Checkpoint, built: Architecture | None) -> dict[str, str]:
    """{name in the model class: checkpoint key} for every stored tensor; the keys themselves where transformers
    does not rename them, or would map two onto one name."""
    same = {key: key for key in checkpoint.tensors}
    if built is None:
        return same
    renamed = {}
    for key in checkpoint.tensors:
        renamed[built.rename(key) or key] = key
    return renamed if len(renamed) == len(same) else same


def _laid_out(module: LoraModule, name: str, shape: tuple[int, ...], built: Architecture | None) -> LoraModule:
    """The module with the base weight's layout: transposed (Conv1D) or not, as the model class says; where
    transformers cannot build it, as the stored shape says, and for a square weight as the adapter's config says."""
    if module.kind != "linear":
        return module
    if built is not None:
        transposed = any(name == t or name.endswith("." + t) or t.endswith("." + name) for t in built.transposed)
    elif shape[0] != shape[-1] and tuple(shape) in ((module.B.shape[0], module.A.shape[1]), (module.A.shape[1], module.B.shape[0])):
        transposed = tuple(shape) == (module.A.shape[1], module.B.shape[0])
    else:
        transposed = module.fan_in_fan_out
    return module if transposed == module.fan_in_fan_out else replace(module, fan_in_fan_out=transposed)


def _check_carried(result: MergeResult, checkpoint: Checkpoint, names, keys: Mapping[str, str]) -> None:
    """The adapters' carried full weights (peft saves a targeted embedding's base weight) must equal the base's.
    keys: {tensor name as the model class has it: the checkpoint key holding it}."""
    from safetensors import safe_open

    for key, carried in sorted(result.adapter.extras.items()):
        path = key.removeprefix(KEY_PREFIX).removesuffix(_CARRIED_SUFFIX)
        name = resolve_tensor(path, names)
        stored = checkpoint.tensors[keys[name]]
        same = stored.shape == tuple(carried.shape)
        if same:
            with safe_open(checkpoint.folder / stored.file, framework="pt") as handle:
                weight = handle.get_tensor(keys[name])
            same = torch.equal(carried.to(weight.dtype), weight) or torch.equal(weight.to(carried.dtype), carried)
        if not same:
            raise NanPeftError(
                f"the adapters carry a full weight for {path} ({_shape(carried.shape)}) that differs from the base "
                f"tensor {name} ({_shape(stored.shape)}): a resized or retrained vocabulary cannot be folded"
            )


def _untie(config: dict, untied: list[tuple[str, ...]], targets: dict[str, str]) -> dict:
    """config with tie_word_embeddings false (wherever it is set), after checking that this unties every group
    whose members now differ."""
    edited = json.loads(json.dumps(config))
    edited["tie_word_embeddings"] = False
    for value in edited.values():
        if isinstance(value, dict) and "tie_word_embeddings" in value:
            value["tie_word_embeddings"] = False
    still = tied_groups(edited)
    for group in still or []:
        for before in untied:
            shared = set(group) & set(before)
            if len({targets.get(name) for name in shared}) > 1:
                raise NanPeftError(
                    f"the adapters change {', '.join(n for n in sorted(shared) if n in targets)} but the model ties "
                    f"{', '.join(sorted(shared))} together even with tie_word_embeddings false: cannot fold"
                )
    return edited


# ----------------------------------------------------------------------------------------------------------
# Streaming: shard by shard, tensor by tensor


def folded_weight(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(W.float() + delta.float()).to(W.dtype) on delta's device, delta in W's layout (LoraModule.weight_delta).
    A float32 delta is added to in place (its memory is reused); pass a copy to keep it."""
    folded = delta if delta.dtype == torch.float32 else delta.float()
    folded += weight.to(folded.device)
    return folded.to(weight.dtype)


def _float_delta(plan: FoldPlan, result: MergeResult, path: str, rule: str, options: Mapping, device) -> torch.Tensor:
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


def _write_streaming(plan: FoldPlan, result: MergeResult, rule: str, options: Mapping, device, tmp: Path) -> None:
    checkpoint = plan.checkpoint
    weight_map, total_size = {}, 0
    # Each written shard is flushed to disk in the background while the next one is computed, so that the
    # publish's final fsync (writer.publish_folder) finds little left to write.
    with ThreadPoolExecutor(max_workers=1) as flusher:
        flushed = []
        for file, names in plan.layout.items():
            total_size += _write_shard(plan, file, names, result, rule, options, device, tmp / file)
            weight_map.update(dict.fromkeys(names, file))
            flushed.append(flusher.submit(_flush, tmp / file))
        for done in flushed:
            done.result()
    if checkpoint.sharded:
        metadata = dict(checkpoint.index_metadata)
        metadata["total_size"] = total_size
        if "total_parameters" in metadata:
            split = [source for names in plan.layout.values() for name, source in names.items() if name != source]
            metadata["total_parameters"] += sum(_numel(checkpoint.tensors[source].shape) for source in split)
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (tmp / CONFIG_NAME).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_shard(plan, file, names, result, rule, options, device, target: Path) -> int:
    """Write one output shard: the header, then each tensor copied or folded. Returns the bytes of tensor data."""
    checkpoint = plan.checkpoint
    stored = {name: checkpoint.tensors[source] for name, source in names.items()}
    order = sorted(names, key=lambda name: (-_ITEMSIZE.get(stored[name].dtype, 1), name))  # aligned, as safetensors does
    header, offset = {}, 0
    if checkpoint.file_metadata[file]:
        header["__metadata__"] = checkpoint.file_metadata[file]
    for name in order:
        size = stored[name].end - stored[name].begin
        header[name] = {"dtype": stored[name].dtype, "shape": list(stored[name].shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    buffers = _Buffers(device)
    with open(checkpoint.folder / file, "rb", buffering=0) as source, open(target, "wb", buffering=0) as out:
        _write_all(out.fileno(), struct.pack("<Q", len(raw)) + raw)
        for name in order:
            entry = stored[name]
            if name not in plan.targets:
                _copy_range(source.fileno(), out.fileno(), entry.begin, entry.end - entry.begin, checkpoint.folder / file)
                continue
            path = plan.targets[name]
            if rule in LOW_RANK:  # a plain weighted sum: added from the factors, a block of rows at a time
                factors = row_factors(result, path, plan.modules[path], options, device)
                _write_folded_rows(source.fileno(), out.fileno(), entry, factors, buffers, checkpoint.folder / file)
                continue
            delta = _float_delta(plan, result, path, rule, options, device)
            folded = folded_weight(_read_tensor(source.fileno(), entry, checkpoint.folder / file), delta).cpu().contiguous()
            del delta
            _write_all(out.fileno(), folded.reshape(-1).view(torch.uint8).numpy().data)
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
    rows, columns = entry.shape[0], _numel(entry.shape[1:])
    dtype, itemsize = FLOATS[entry.dtype], _ITEMSIZE[entry.dtype]
    step = max(1, min(rows, FOLD_CHUNK_BYTES // (columns * max(itemsize, 4))))
    buffers.fit(step * columns)
    for begin in range(0, rows, step):
        count = min(step, rows - begin)
        raw = buffers.raw[: count * columns * itemsize]
        _read_into(source, raw, entry.begin + begin * columns * itemsize, path)
        weight = raw.view(dtype).view(count, columns)
        work = buffers.work[: count * columns].view(count, columns)
        if dtype == torch.float32 and buffers.device.type == "cpu":
            work = weight  # add in place
        else:
            work.copy_(weight)
        work.addmm_(left[begin : begin + count], right)
        if work.data_ptr() != weight.data_ptr():
            weight.copy_(work)
        _write_all(out, raw.numpy().data)


def _flush(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _read_into(fd: int, data: torch.Tensor, offset: int, path: Path) -> None:
    view, done = memoryview(data.numpy()), 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], offset + done)
        if read <= 0:
            raise NanPeftError(f"{path}: truncated while reading")
        done += read


def _read_tensor(fd: int, entry: StoredTensor, path: Path) -> torch.Tensor:
    data = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    view, done = memoryview(data.numpy()), 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], entry.begin + done)
        if read <= 0:
            raise NanPeftError(f"{path}: truncated while reading")
        done += read
    return data.view(FLOATS[entry.dtype]).reshape(entry.shape)


def _copy_range(src: int, dst: int, offset: int, length: int, path: Path) -> None:
    """Append `length` bytes of `src` from `offset` to `dst`: in the kernel where it can, else in chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                copied = os.copy_file_range(src, dst, length - done, offset + done)
                if copied <= 0:
                    break
                done += copied
        except OSError:
            pass
    while done < length:
        chunk = os.pread(src, min(length - done, 64 << 20), offset + done)
        if not chunk:
            raise NanPeftError(f"{path}: truncated while copying")
        _write_all(dst, chunk)
        done += len(chunk)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


# ----------------------------------------------------------------------------------------------------------
# Placement: transformers + accelerate over GPUs and CPU


def _load_placed(plan: FoldPlan, device_map, max_memory):
    """Load the base model spread by `device_map`; refuse disk offload (its re-saved weights are not ours)."""
    import transformers

    if isinstance(device_map, Mapping) and "disk" in device_map.values():
        raise NanPeftError(_DISK_REFUSAL)
    config = plan.checkpoint.folder / CONFIG_NAME
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModelForCausalLM
    dtypes = {entry.dtype for entry in plan.checkpoint.tensors.values() if entry.dtype in FLOATS}
    dtype = FLOATS[dtypes.pop()] if len(dtypes) == 1 else "auto"
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = model_class.from_pretrained(plan.checkpoint.folder, device_map=device_map, max_memory=max_memory, **{dtype_key: dtype})
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = _first_line(error)
        raise NanPeftError(f"{plan.checkpoint.folder}: transformers could not load it with device_map={device_map!r} ({reason})") from None
    if "disk" in (getattr(model, "hf_device_map", None) or {}).values():
        raise NanPeftError(_DISK_REFUSAL)
    return model


_DISK_REFUSAL = (
    "the device map offloads weights to disk, which folding does not support (a re-saved disk-offloaded model can "
    "lose weights): give GPUs/CPU more max_memory, or fold with the streaming path (no device_map)"
)


def _fold_placed(model, plan: FoldPlan, result: MergeResult, rule: str, options: Mapping, device) -> None:
    """Add each update to its parameter, on the device holding it (CPU-offloaded ones: in accelerate's CPU copy)."""
    parameters, sources = dict(model.named_parameters(remove_duplicate=False)), plan.sources
    for name in plan.targets:
        if plan.loaded.get(name, name) not in parameters:
            raise NanPeftError(f"the loaded model has no parameter {name} (transformers renamed the checkpoint's tensors?): fold without device_map")
    for group in plan.untied:
        present = [name for name in group if name in parameters]
        if any(parameters[name].device.type == "meta" for name in present):
            raise NanPeftError(
                f"the tied weights {', '.join(group)} are offloaded: folding a change to them needs them on a device "
                "(raise max_memory) or the streaming path"
            )
        for name in present[1:]:
            owner, _, attribute = name.rpartition(".")
            clone = torch.nn.Parameter(parameters[name].detach().clone(), requires_grad=False)
            setattr(model.get_submodule(owner), attribute, clone)
            parameters[name] = clone
    if plan.untied:
        model.config.tie_word_embeddings = False
    with torch.no_grad():
        for name, path in plan.targets.items():
            key, name = name, plan.loaded.get(name, name)  # the checkpoint's name, the model's
            parameter = parameters[name]
            offloaded = parameter.device.type == "meta"
            weight = offloaded_tensor(model, name) if offloaded else parameter.data
            expected = plan.checkpoint.tensors[sources[key]].shape
            if tuple(weight.shape) != expected:
                raise NanPeftError(
                    f"the loaded model's {name} is {_shape(weight.shape)}, its checkpoint tensor {_shape(expected)}: fold without device_map"
                )
            where = weight.device if weight.device.type != "cpu" else device
            weight.copy_(folded_weight(weight, _float_delta(plan, result, path, rule, options, where)))
            if offloaded and not torch.equal(offloaded_tensor(model, name), weight):
                raise NanPeftError(f"{name} is offloaded where an update does not persist: fold without device_map")


def offloaded_tensor(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor accelerate keeps for an offloaded (meta) parameter: its hook's weights_map entry, which is what
    save_pretrained writes. For CPU offload it is the stored tensor itself, so updating it in place persists."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        hook = getattr(model.get_submodule(".".join(parts[:cut])), "_hf_hook", None)
        for candidate in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
            weights = getattr(candidate, "weights_map", None)
            key = ".".join(parts[cut:])
            if weights is not None and key in weights:
                return weights[key]
    raise NanPeftError(f"{name} is offloaded, but no accelerate hook holds its weights: fold without device_map")


def _save_placed(model, plan: FoldPlan, tmp: Path) -> None:
    """save_pretrained, then check that it wrote every tensor the streaming path would, in its stored dtype and
    shape: transformers loads one dtype for the whole model, and leaves out tensors its class does not hold
    (an extra prediction layer) or initialises ones the checkpoint lacks."""
    largest = max(sum(e.end - e.begin for e in plan.checkpoint.tensors.values() if e.file == file) for file in plan.checkpoint.files)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=largest)
    (tmp / CONFIG_NAME).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    saved, expected = read_checkpoint(tmp).tensors, {name: plan.checkpoint.tensors[source] for name, source in plan.sources.items()}
    instead = "fold without device_map (the streaming path writes every tensor as stored)"
    for names, what in ((sorted(expected.keys() - saved.keys()), "leaves out"), (sorted(saved.keys() - expected.keys()), "adds")):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise NanPeftError(f"loading the base with transformers {what} the tensor {names[0]}{more}: {instead}")
    for name, entry in expected.items():
        if (saved[name].dtype, saved[name].shape) != (entry.dtype, entry.shape):
            raise NanPeftError(
                f"loading the base with transformers turns {name} from {entry.dtype} {_shape(entry.shape)} into "
                f"{saved[name].dtype} {_shape(saved[name].shape)}: {instead}"
            )


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _copy_other_files(plan: FoldPlan, tmp: Path) -> None:
    """Copy the base folder's top-level files that are not weights (tokenizer, generation config, ...)."""
    for source in sorted(plan.checkpoint.folder.iterdir()):
        name = source.name
        if name.startswith(".") or name == CONFIG_NAME or _WEIGHT_FILE.fullmatch(name) or not source.is_file():
            continue
        shutil.copyfile(source, tmp / name)


def _read_json(path: Path, label: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise NanPeftError(f"{label}: unreadable ({_first_line(error)})") from None


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
