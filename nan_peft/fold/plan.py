"""The fold's plan: which checkpoint tensor each adapted module updates, in which layout, and the tied weights
written apart, decided from headers and config alone before anything is written."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ..errors import NanPeftError
from ..lora import KEY_PREFIX, LoraModule
from .architecture import Architecture, architecture, tied_groups
from .checkpoint import MODEL_CONFIG_NAME, FLOATS, Checkpoint, read_checkpoint, read_json, resolve_base, shape_text

if TYPE_CHECKING:
    from ..merge import MergeResult

_CARRIED_SUFFIX = ".base_layer.weight"


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
    config = read_json(folder / MODEL_CONFIG_NAME, f"{folder.name}/{MODEL_CONFIG_NAME}") if (folder / MODEL_CONFIG_NAME).is_file() else None
    if not isinstance(config, dict):
        raise NanPeftError(f"{folder}: missing or invalid {MODEL_CONFIG_NAME}")
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
                f"module {path}: the base tensor {name} has shape {shape_text(stored.shape)} but the adapters' update is "
                f"{shape_text(expected)}: the adapters were trained on another model"
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
                f"the adapters carry a full weight for {path} ({shape_text(carried.shape)}) that differs from the base "
                f"tensor {name} ({shape_text(stored.shape)}): a resized or retrained vocabulary cannot be folded"
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
