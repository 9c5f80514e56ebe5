"""The peft adapter format as files: their names, and the checksum nan-peft writes into what it writes and checks
on read (shared by the reader and the writer)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CHECKSUM_KEY = "nan_peft.sha256"
"""Safetensors metadata entry holding content_digest(); written by nan-peft, checked on read when present."""
_DIGESTED_CONFIG = ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")


def content_digest(tensors: Mapping[str, torch.Tensor], config: Mapping) -> str:
    """sha256 of an adapter's content: every tensor's name, dtype, shape and bytes, and the config fields that
    set the update's scale. Stored in the safetensors metadata (CHECKSUM_KEY) by the writer, so that a
    corrupted or edited file is refused on read instead of loading different numbers."""
    digest = hashlib.sha256(json.dumps({key: config.get(key) for key in _DIGESTED_CONFIG}, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
