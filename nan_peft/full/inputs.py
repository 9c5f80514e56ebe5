"""The inputs of a full-checkpoint merge, read from headers and configs alone and checked against the base
before any tensor is read: full fine-tunes (a transformers folder: config.json and safetensors weights) and LoRA
adapters (their update s B A, laid out as the base tensor it adds to, is their task vector).

The plan says, for every float tensor of the base, its output shape and, for each input, whether it has a task
vector there. Tensors whose first (vocabulary) dimension differs are refused unless `vocab` says how to align
them; any other difference of names, shapes or architecture is refused, naming the input and the tensor."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import NanPeftError
from ..fold.checkpoint import FLOATS, MODEL_CONFIG_NAME, Checkpoint, read_checkpoint, read_json, resolve_base, shape_text
from ..fold.plan import plan_fold
from ..lora import LoraAdapter, LoraModule
from ..peft_format import CONFIG_NAME as ADAPTER_CONFIG
from ..reader import unique_names
from ..spec import VOCABS


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a local full model folder (config.json, no adapter_config.json) rather than an adapter."""
    folder = Path(path)
    return folder.is_dir() and (folder / MODEL_CONFIG_NAME).is_file() and not (folder / ADAPTER_CONFIG).is_file()


@dataclass
class Source:
    """One input: a full fine-tune (checkpoint) or a LoRA adapter (modules: base tensor name -> laid-out module)."""

    name: str
    path: str
    checkpoint: Checkpoint | None = None
    adapter: LoraAdapter | None = None
    modules: dict[str, LoraModule] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "full" if self.checkpoint is not None else "lora"

    def has(self, name: str) -> bool:
        return self.checkpoint is not None or name in self.modules


@dataclass
class FullPlan:
    """What a full-checkpoint merge reads and writes."""

    base: Checkpoint
    config: dict
    """config.json of the output (the base's; vocab_size set to the union's)."""
    sources: list[Source]
    tensors: list[str]
    """The base's float tensors, in its shards' order: each gets a merged value."""
    shapes: dict[str, tuple[int, ...]]
    """Output shape of every tensor written (a vocabulary tensor grows to the union's rows)."""
    vocab: str | None = None
    tokenizer_from: Path | None = None
    """The folder whose tokenizer files are copied (the base's, or with vocab union the largest vocabulary's)."""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(source.name for source in self.sources)


def plan_full(base: str | os.PathLike | None, paths, adapters: dict[int, LoraAdapter], vocab: str | None = None) -> FullPlan:
    """Read the base's and the full inputs' headers and configs, map each adapter onto the base's tensors, and
    refuse (NanPeftError, one line) anything that is not a fine-tune of this base. adapters: {position in
    paths: the adapter already read} for the inputs that are adapters."""
    if base is None:
        raise NanPeftError("merging full checkpoints needs the base model they were fine-tuned from: --base BASE")
    if vocab is not None and vocab not in VOCABS:
        raise NanPeftError(f"unknown vocab {vocab!r}; choose from {', '.join(VOCABS)}")
    folder = resolve_base(base)
    checkpoint = read_checkpoint(folder)
    config = _config(folder)
    names = unique_names([Path(str(p)).name or str(p) for p in paths])
    sources = []
    for k, (path, name) in enumerate(zip(paths, names)):
        if k in adapters:
            sources.append(_lora_source(name, str(path), adapters[k], folder))
            continue
        other = Path(path)
        if other.resolve() == folder.resolve():
            raise NanPeftError(f"{path} is the base model itself: its task vector is zero")
        tuned_config = _config(other)
        _same_architecture(other, tuned_config, config, folder)
        tuned = read_checkpoint(other)
        _same_tensors(path, tuned, checkpoint, vocab, (config.get("vocab_size"), tuned_config.get("vocab_size")))
        sources.append(Source(name, str(path), checkpoint=tuned))
    if not any(source.checkpoint is not None for source in sources):
        raise NanPeftError("no full checkpoint among the inputs: merge adapters without --base")
    order = {file: i for i, file in enumerate(checkpoint.files)}  # the order write_checkpoint writes them in
    tensors = [name for name, entry in sorted(checkpoint.tensors.items(), key=lambda item: (order[item[1].file], item[1].begin))
               if entry.dtype in FLOATS]
    plan = FullPlan(checkpoint, config, sources, tensors, {name: entry.shape for name, entry in checkpoint.tensors.items()}, vocab, folder)
    counts = {name: rows(plan, name) for name in tensors if checkpoint.tensors[name].shape}
    grown = {name: max(c) for name, c in counts.items() if vocab == "union" and max(c) > checkpoint.tensors[name].shape[0]}
    if grown:
        plan.shapes.update({name: (size, *checkpoint.tensors[name].shape[1:]) for name, size in grown.items()})
        largest = max(range(len(sources)), key=lambda k: max(counts[name][k] for name in grown))
        plan.config = {**config, "vocab_size": max(grown.values())}
        plan.tokenizer_from = Path(sources[largest].path)
    return plan


def _config(folder: Path) -> dict:
    config = read_json(folder / MODEL_CONFIG_NAME, f"{folder.name}/{MODEL_CONFIG_NAME}") if (folder / MODEL_CONFIG_NAME).is_file() else None
    if not isinstance(config, dict):
        raise NanPeftError(f"{folder}: missing or invalid {MODEL_CONFIG_NAME}")
    return config


def _same_architecture(path: Path, config: dict, base: dict, base_folder: Path) -> None:
    for key in ("model_type", "architectures"):
        if config.get(key) != base.get(key):
            raise NanPeftError(f"{path}: {key} {config.get(key)!r} but the base {base_folder} has {base.get(key)!r}: not a fine-tune of this base")


def _same_tensors(path, tuned: Checkpoint, base: Checkpoint, vocab: str | None, sizes: tuple) -> None:
    """Same names, float dtypes and shapes as the base; a differing first dimension only with `vocab`, and only where
    it is each config's vocab_size (sizes: the base's and the fine-tune's)."""
    missing = sorted(set(base.tensors) - set(tuned.tensors))
    extra = sorted(set(tuned.tensors) - set(base.tensors))
    if missing:
        raise NanPeftError(f"{path}: no tensor {missing[0]}, which the base has ({len(missing)} missing): not a fine-tune of this base")
    if extra:
        raise NanPeftError(f"{path}: tensor {extra[0]} is not in the base ({len(extra)} extra): not a fine-tune of this base")
    for name, entry in base.tensors.items():
        other = tuned.tensors[name]
        if entry.dtype in FLOATS and other.dtype not in FLOATS:
            raise NanPeftError(f"{path}: tensor {name} is {other.dtype}, not a float (quantized?); merge unquantized checkpoints")
        if other.shape == entry.shape:
            continue
        vocabulary = (len(other.shape) == len(entry.shape) >= 1 and other.shape[1:] == entry.shape[1:] and entry.dtype in FLOATS
                      and (entry.shape[0], other.shape[0]) == sizes)
        hint = " (a resized vocabulary: --vocab base keeps the base's rows, --vocab union all)" if vocabulary and vocab is None else ""
        if not vocabulary or vocab is None:
            raise NanPeftError(f"{path}: tensor {name} is {shape_text(other.shape)} but the base's is {shape_text(entry.shape)}{hint}: "
                               "not a fine-tune of this base")


def rows(plan: FullPlan, name: str) -> list[int]:
    """The first dimension of tensor `name` in each input (an adapter's is the base's)."""
    base = plan.base.tensors[name].shape[0]
    return [s.checkpoint.tensors[name].shape[0] if s.checkpoint is not None else base for s in plan.sources]


def _lora_source(name: str, path: str, adapter: LoraAdapter, folder: Path) -> Source:
    """The adapter's modules keyed by the base tensor each updates, laid out as that tensor (the fold's plan)."""
    if adapter.saved:
        raise NanPeftError(f"{path}: the adapter carries full modules ({', '.join(adapter.saved_modules)}: modules_to_save); "
                           "merging them into a full checkpoint is not supported")
    paths = tuple(sorted(adapter.modules))
    stand_in = SimpleNamespace(  # what plan_fold reads of a merge: its modules, sources and carried weights
        coefficients=SimpleNamespace(modules=paths, values=torch.ones(len(paths), 1)), sources=[adapter], adapter=adapter,
    )
    plan = plan_fold(stand_in, folder)
    if plan.untied:
        raise NanPeftError(f"{path}: the adapter changes a tied weight ({', '.join(plan.untied[0])}); merging it into a full checkpoint is not supported")
    return Source(name, path, adapter=adapter, modules={key: plan.modules[module] for key, module in plan.targets.items()})


__all__ = ["FullPlan", "Source", "VOCABS", "is_checkpoint", "plan_full", "rows"]
