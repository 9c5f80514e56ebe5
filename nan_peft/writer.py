"""Write a LoRA adapter that peft and serving engines load as is, and publish folders atomically."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .errors import NanPeftError
from .gram import pad_rank
from .lora import FACTOR_KEYS, KEY_PREFIX, LoraAdapter
from .reader import CONFIG_NAME, SAFETENSORS_NAME


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
    state.update({key: tensor.contiguous() for key, tensor in sorted(adapter.extras.items())})
    return state


def adapter_config(adapter: LoraAdapter, rank: int | None = None) -> dict:
    """adapter_config.json for the servable form: r = lora_alpha (scale 1), no rsLoRA, no patterns, no
    DoRA, no modules_to_save, and target_modules naming exactly the written modules."""
    rank = servable_rank(adapter, rank)
    source = adapter.config
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(adapter.modules),
        fan_in_fan_out=any(m.fan_in_fan_out for m in adapter.modules.values()),
        bias="none",
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        task_type=source.get("task_type"),
        base_model_name_or_path=source.get("base_model_name_or_path"),
        revision=source.get("revision"),
        inference_mode=True,
    ).to_dict()
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value for key, value in config.items()}


def write_adapter(
    adapter: LoraAdapter,
    folder: str | os.PathLike,
    rank: int | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> Path:
    """Write `adapter` to `folder` in its servable form (see adapter_config), atomically (publish_folder)."""
    state = adapter_state_dict(adapter, rank)
    config = adapter_config(adapter, rank)

    def write(tmp: Path) -> None:
        save_file(state, tmp / SAFETENSORS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content, encoding="utf-8")

    return publish_folder(folder, write, overwrite)


def publish_folder(folder: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create `folder` by calling write(tmp) on a temporary sibling, then renaming it into place.

    A reader (a server hot-swapping adapters) sees the old folder or the complete new one, never a partial
    one: on Linux an existing folder is swapped in one renameat2(RENAME_EXCHANGE); elsewhere the old folder
    is moved aside first. If `write` fails, nothing is left behind and an existing folder is untouched.
    """
    folder = Path(folder)
    if folder.exists() and not (overwrite and folder.is_dir()):
        what = "a file" if not folder.is_dir() else "a folder"
        raise NanPeftError(f"{folder} already exists ({what}); pass overwrite=True / --force to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        write(tmp)
        _sync(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        if folder.exists():
            _swap_in(tmp, folder)
            shutil.rmtree(tmp)  # now holds the old contents
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _sync(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _swap_in(new: Path, old: Path) -> None:
    """Exchange the two folders atomically where the OS allows it; `new` ends up holding the old contents."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        AT_FDCWD, RENAME_EXCHANGE = -100, 2
        if libc.renameat2(AT_FDCWD, os.fsencode(new), AT_FDCWD, os.fsencode(old), RENAME_EXCHANGE) == 0:
            return
    except (AttributeError, OSError):
        pass
    aside = new.with_name(new.name + ".old")
    os.rename(old, aside)
    os.rename(new, old)
    os.rename(aside, new)
