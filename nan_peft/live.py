"""Merging inside a loaded PeftModel, like peft's add_weighted_adapter but with NAN (or any provider's)
coefficients, exact cat / QR-SVD math and any merge rule."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict, set_peft_model_state_dict

from .errors import NanPeftError
from .lora import KEY_PREFIX, LoraAdapter, module_from_peft
from .merge import MergeResult, merge_adapters
from .policy import check_config
from .writer import adapter_config, adapter_state_dict


def adapter_from_model(model: PeftModel, name: str) -> LoraAdapter:
    """Read adapter `name` out of a loaded PeftModel, with each layer's current scaling, and the full modules it
    saves (peft's ModulesToSaveWrapper copies, e.g. a task head) into `saved`, keyed as peft saves them."""
    if name not in model.peft_config:
        raise NanPeftError(f"the model has no adapter {name!r} (it has {', '.join(model.peft_config)})")
    # the config as peft's PeftConfig.save_pretrained writes it (peft/config.py: sets, e.g. target_modules, as lists)
    config = {k: sorted(v, key=str) if isinstance(v, set) else v for k, v in model.peft_config[name].to_dict().items()}
    check_config(config, f"adapter {name}")
    modules, saved = {}, {}
    for path, layer in model.named_modules():
        if isinstance(layer, ModulesToSaveWrapper) and name in layer.modules_to_save:
            state = layer.modules_to_save[name].state_dict()
            saved.update({f"{path}.{key}": tensor.detach() for key, tensor in state.items()})
            continue
        if not isinstance(layer, LoraLayer):
            continue
        if name in layer.lora_A:
            A, B, kind = layer.lora_A[name].weight, layer.lora_B[name].weight, "linear"
        elif name in layer.lora_embedding_A:
            A, B, kind = layer.lora_embedding_A[name], layer.lora_embedding_B[name], "embedding"
        else:
            continue
        modules[path.removeprefix(KEY_PREFIX)] = module_from_peft(
            A.detach(), B.detach(), float(layer.scaling[name]), kind, bool(getattr(layer, "fan_in_fan_out", False))
        )
    if not modules:
        raise NanPeftError(f"adapter {name} has no LoRA layers in this model")
    return LoraAdapter(name=name, source=f"<{type(model).__name__}:{name}>", config=config, modules=modules, saved=saved)


def add_nan_weighted_adapter(
    model: PeftModel,
    adapters: Sequence[str],
    adapter_name: str,
    combine: str | None = None,
    rank: int | None = None,
    coefficients: str | Sequence[float] | None = None,
    device: str | torch.device | None = None,
    **options,
) -> MergeResult:
    """Add `adapter_name` to `model`: the merge of its adapters `adapters` (see merge_adapters for the
    options). The sources stay untouched and active adapters do not change; activate the new one with
    model.set_adapter(adapter_name), save it with model.save_pretrained(..., selected_adapters=[...]).
    Returns the MergeResult (coefficients, norms, per-module report). Full modules the sources save (task
    heads, modules_to_save) are not part of the new adapter: a warning says so, as result.notices() does.
    """
    if adapter_name in model.peft_config:
        raise NanPeftError(f"the model already has an adapter named {adapter_name!r}")
    sources = [adapter_from_model(model, name) for name in adapters]
    if device is None:
        device = next(iter(sources[0].modules.values())).A.device
    result = merge_adapters(sources, combine, rank, coefficients, device=device, **options)
    # Keep the adapters' own dtype for the new factors (peft may hold fp32 factors on a bf16 model).
    merged = result.adapter
    state = {k: v for k, v in adapter_state_dict(merged).items() if k not in merged.extras}
    config = adapter_config(merged)
    model.add_adapter(adapter_name, LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    # peft's task models give every new adapter its own copy of the task head (modules_to_save), made from the
    # base model's head; the merge keeps that copy as it is and sets only the LoRA factors.
    state = {**get_peft_model_state_dict(model, adapter_name=adapter_name), **state}
    loaded = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [key for key in loaded.missing_keys if f".{adapter_name}." in key or key.endswith(f".{adapter_name}")]
    if loaded.unexpected_keys or missing:
        raise NanPeftError(f"could not place the merged weights: unexpected {loaded.unexpected_keys[:3]}, missing {missing[:3]}")
    for notice in result.notices():
        warnings.warn(notice, stacklevel=2)
    return result
