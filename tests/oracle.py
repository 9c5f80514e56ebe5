"""Independent references: each adapter's dense update as peft itself computes it (get_delta_weight)."""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from models import BASES


def load_sources(base: str, paths, names=None, base_model=None) -> PeftModel:
    """Load several adapters into one PeftModel, all of them active."""
    names = names or [f"s{i}" for i in range(len(paths))]
    model = PeftModel.from_pretrained(base_model or BASES[base](), paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    return model


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    return {name.removeprefix("base_model.model."): m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def peft_deltas(model: PeftModel) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {adapter name: s * B @ A as an (m, n) float64 matrix}}, from peft's get_delta_weight."""
    deltas = {}
    for path, layer in lora_layers(model).items():
        for name in set(layer.lora_A) | set(layer.lora_embedding_A):
            delta = layer.get_delta_weight(name).detach().double()
            if name in layer.lora_embedding_A or getattr(layer, "fan_in_fan_out", False):
                delta = delta.T
            deltas.setdefault(path, {})[name] = delta.reshape(delta.shape[0], -1)
    return deltas


def scale_sources(model: PeftModel, coefficients: dict[str, dict[str, float]]) -> None:
    """Multiply each source's scaling at each module by its coefficient {module: {adapter: c}}."""
    for path, layer in lora_layers(model).items():
        for name in list(layer.scaling):
            layer.scaling[name] *= coefficients[path][name]
