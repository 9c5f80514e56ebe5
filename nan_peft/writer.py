"""Write a LoRA adapter that peft and serving engines load as is (published atomically by nan_peft.publish)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import NanPeftError, all_finite
from .gram import pad_rank
from .lora import FACTOR_KEYS, KEY_PREFIX, LoraAdapter
from .peft_format import CHECKSUM_KEY, CONFIG_NAME, SAFETENSORS_NAME, content_digest
from .publish import check_file_names, publish_folder, write_files


def servable_rank(adapter: LoraAdapter, rank: int | None = None) -> int:
    """The one global rank the adapter is written with: its largest module rank, or `rank` if larger."""
    needed = max(adapter.ranks)
    if rank is not None and rank < needed:
        raise NanPeftError(f"cannot write rank {rank}: module ranks go up to {needed}")
    return rank or needed


def adapter_state_dict(adapter: LoraAdapter, rank: int | None = None) -> dict[str, torch.Tensor]:
    """PEFT state dict with one global rank (zero padding) and each module's scale baked into lora_B."""
    rank = servable_rank(adapter, rank)
    state = {}
    for path in sorted(adapter.modules):
        module = adapter.modules[path]
        B = module.B if module.scale == 1 else (module.B.to(torch.float64) * module.scale).to(module.B.dtype)
        B, A = pad_rank(B, module.A, rank)
        A, B = module.peft_factors(A, B)
        a_key, b_key = FACTOR_KEYS[module.kind]
        state[f"{KEY_PREFIX}{path}.{a_key}"] = A.contiguous()
        state[f"{KEY_PREFIX}{path}.{b_key}"] = B.contiguous()
    state.update({key: tensor.contiguous() for key, tensor in sorted({**adapter.extras, **adapter.saved}.items())})
    for key, tensor in state.items():
        if tensor.is_floating_point() and not all_finite(tensor):
            raise NanPeftError(
                f"cannot write {key}: it holds NaN or Inf ({str(tensor.dtype).removeprefix('torch.')} overflow? "
                "merge with dtype=float32)"
            )
    return state


_HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")


def adapter_config(adapter: LoraAdapter, rank: int | None = None) -> dict:
    """adapter_config.json for the servable form: r = lora_alpha (scale 1), no rsLoRA, no patterns, no
    DoRA, target_modules naming exactly the written modules, and modules_to_save naming the adapter's saved
    full modules (none for an adapter that serving engines must load). A head-less adapter of a task type
    whose peft model class adds the task head to modules_to_save (sequence / token classification, question
    answering) is written without task_type: peft would otherwise look for a head it does not hold.

    Only the fields of a plain LoRA are written, with the values peft gives them (tests compare them with
    peft's LoraConfig): every peft release and serving engine reads them, any field left out takes peft's
    default, and the file does not depend on which peft is installed (nor does writing import it)."""
    rank = servable_rank(adapter, rank)
    source = adapter.config
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "bias": "none",
        "fan_in_fan_out": any(m.fan_in_fan_out for m in adapter.modules.values()),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "modules_to_save": sorted(adapter.saved_modules) or None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": source.get("revision"),
        "target_modules": sorted(adapter.modules),
        "task_type": None if source.get("task_type") in _HEAD_TASKS and not adapter.saved else source.get("task_type"),
        "use_dora": False,
        "use_rslora": False,
    }


def write_adapter(
    adapter: LoraAdapter,
    folder: str | os.PathLike,
    rank: int | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
    protected: Sequence[str | os.PathLike] = (),
    subfolders: Mapping[str, LoraAdapter] | None = None,
) -> Path:
    """Write `adapter` to `folder` in its servable form (see adapter_config), atomically (publish_folder).

    The safetensors metadata carries a checksum of the tensors and of the config's scale fields
    (reader.content_digest) that read_adapter verifies. extra_files are written next to the adapter; their
    names must be plain file names. `protected` folders (the inputs) are never replaced or written into.
    subfolders {name: adapter} are written as complete adapters in folder/name, in the same publish: peft's
    own layout for several adapters (PeftModel.from_pretrained(model, folder, subfolder=name)).
    """
    subfolders = dict(subfolders or {})
    check_file_names(extra_files or {}, reserved=(CONFIG_NAME, SAFETENSORS_NAME))
    check_file_names(subfolders, reserved=(CONFIG_NAME, SAFETENSORS_NAME, *(extra_files or {})))
    contents = [(Path(), adapter)] + [(Path(name), sub) for name, sub in sorted(subfolders.items())]
    prepared = [(where, *_prepared(sub, rank)) for where, sub in contents]

    def write(tmp: Path) -> None:
        for where, state, config, metadata in prepared:
            (tmp / where).mkdir(exist_ok=True)
            save_file(state, tmp / where / SAFETENSORS_NAME, metadata=metadata)
            _sort_metadata(tmp / where / SAFETENSORS_NAME)
            (tmp / where / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        write_files(tmp, extra_files or {})

    return publish_folder(folder, write, overwrite, protected)


def _prepared(adapter: LoraAdapter, rank: int | None) -> tuple[dict, dict, dict]:
    state = adapter_state_dict(adapter, rank)
    config = adapter_config(adapter, rank)
    return state, config, {"format": "pt", CHECKSUM_KEY: content_digest(state, config)}


def _sort_metadata(file: Path) -> None:
    """Rewrite the safetensors header with its metadata in sorted order, in place and at the same length.

    safetensors serialises metadata from a hash map, so with more than one entry their order, and the file's
    bytes, change from process to process; sorted, the same merge gives the same bytes every time.
    """
    with open(file, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        raw = handle.read(size)
        header = json.loads(raw)
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size or json.loads(text) != json.loads(raw):
            return  # never expected; the file stays valid, only its metadata order is left as written
        handle.seek(8)
        handle.write(text + b" " * (size - len(text)))


