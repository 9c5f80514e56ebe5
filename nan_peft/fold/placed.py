"""The placed fold: the base model loaded with transformers and accelerate over the GPUs and the CPU, each update
added on the device that holds its weight, and the model saved; disk offload is refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import NanPeftError, first_line
from .checkpoint import MODEL_CONFIG_NAME, FLOATS, read_checkpoint, shape_text
from .plan import FoldPlan
from .stream import float_delta, folded_weight

if TYPE_CHECKING:
    from ..merge import MergeResult


def load_placed(plan: FoldPlan, device_map, max_memory):
    """Load the base model spread by `device_map`; refuse disk offload (its re-saved weights are not ours)."""
    import transformers

    if isinstance(device_map, Mapping) and "disk" in device_map.values():
        raise NanPeftError(_DISK_REFUSAL)
    config = plan.checkpoint.folder / MODEL_CONFIG_NAME
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModelForCausalLM
    dtypes = {entry.dtype for entry in plan.checkpoint.tensors.values() if entry.dtype in FLOATS}
    dtype = FLOATS[dtypes.pop()] if len(dtypes) == 1 else "auto"
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        model = model_class.from_pretrained(plan.checkpoint.folder, device_map=device_map, max_memory=max_memory, **{dtype_key: dtype})
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        reason = first_line(error)
        raise NanPeftError(f"{plan.checkpoint.folder}: transformers could not load it with device_map={device_map!r} ({reason})") from None
    if "disk" in (getattr(model, "hf_device_map", None) or {}).values():
        raise NanPeftError(_DISK_REFUSAL)
    return model


_DISK_REFUSAL = (
    "the device map offloads weights to disk, which folding does not support (a re-saved disk-offloaded model can "
    "lose weights): give GPUs/CPU more max_memory, or fold with the streaming path (no device_map)"
)


def fold_placed(model, plan: FoldPlan, result: MergeResult, rule: str, options: Mapping, device) -> None:
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
                    f"the loaded model's {name} is {shape_text(weight.shape)}, its checkpoint tensor {shape_text(expected)}: fold without device_map"
                )
            where = weight.device if weight.device.type != "cpu" else device
            weight.copy_(folded_weight(weight, float_delta(plan, result, path, rule, options, where)))
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


def save_placed(model, plan: FoldPlan, tmp: Path) -> None:
    """save_pretrained, then check that it wrote every tensor the streaming path would, in its stored dtype and
    shape: transformers loads one dtype for the whole model, and leaves out tensors its class does not hold
    (an extra prediction layer) or initialises ones the checkpoint lacks."""
    largest = max(sum(e.end - e.begin for e in plan.checkpoint.tensors.values() if e.file == file) for file in plan.checkpoint.files)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=largest)
    (tmp / MODEL_CONFIG_NAME).write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    saved, expected = read_checkpoint(tmp).tensors, {name: plan.checkpoint.tensors[source] for name, source in plan.sources.items()}
    instead = "fold without device_map (the streaming path writes every tensor as stored)"
    for names, what in ((sorted(expected.keys() - saved.keys()), "leaves out"), (sorted(saved.keys() - expected.keys()), "adds")):
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise NanPeftError(f"loading the base with transformers {what} the tensor {names[0]}{more}: {instead}")
    for name, entry in expected.items():
        if (saved[name].dtype, saved[name].shape) != (entry.dtype, entry.shape):
            raise NanPeftError(
                f"loading the base with transformers turns {name} from {entry.dtype} {shape_text(entry.shape)} into "
                f"{saved[name].dtype} {shape_text(saved[name].shape)}: {instead}"
            )
