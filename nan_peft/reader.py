"""Read PEFT LoRA adapters from disk and refuse anything whose update is not s * B @ A."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import NanPeftError, all_finite, first_line
from .hub import resolve_folder
from .lora import FACTOR_KEY, KEY_PREFIX, LoraAdapter, LoraModule, lora_scale, module_from_peft, saved_module
from .peft_format import BIN_NAME, CHECKSUM_KEY, CONFIG_NAME, SAFETENSORS_NAME, content_digest
from .policy import TASK_TYPES, check_config
from .targeting import ConfigProblem, pattern_key, refusal

__all__ = ["BIN_NAME", "CHECKSUM_KEY", "CONFIG_NAME", "SAFETENSORS_NAME", "TASK_TYPES", "check_compatible", "check_config",
           "content_digest", "read_adapter", "read_adapters", "saved_module"]


_CARRIED_SUFFIX = ".base_layer.weight"  # a targeted embedding's full weight, saved by peft's save_embedding_layers


def read_adapter(path: str | os.PathLike, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (or a Hub id, through huggingface_hub) into a LoraAdapter.

    Handles rank_pattern / alpha_pattern, rsLoRA (s = alpha / sqrt(r)), Conv1D (fan_in_fan_out), embedding
    and Conv LoRA. Raises NanPeftError, naming the adapter, for every variant whose update is not
    s * B @ A or that cannot be merged faithfully (DoRA, lora_bias, trained biases, ...). Full modules of
    modules_to_save (task heads) are read into `saved`.
    """
    folder = _resolve(path)
    label = str(path)
    for _ in range(_READ_ATTEMPTS):
        before = _file_states(folder)
        try:
            config, modules, extras, saved, digests = _read_folder(folder, label)
        except NanPeftError:
            if _file_states(folder) == before:
                raise
            continue  # republished while we read: the config and the weights may be from different versions
        if _file_states(folder) == before:
            break
    else:
        raise NanPeftError(f"{label}: the adapter kept changing while it was being read; try again once it is written")
    return LoraAdapter(
        name=name or _display_name(path), source=str(folder), config=config, modules=modules, extras=extras, saved=saved, digests=digests
    )


def read_adapters(
    paths: Sequence[str | os.PathLike | LoraAdapter],
    allow_different_bases: bool = False,
    allow_duplicates: bool = False,
    on_read: Callable[[], object] | None = None,
) -> list[LoraAdapter]:
    """Read several adapters and check that they can be merged: one base model, compatible module shapes.

    The same adapter given twice (the same folder, a copy of it, or the same object) is refused unless
    allow_duplicates: merging it twice silently doubles its weight. Adapters with the same name are renamed
    a, a#2, ... in the returned list; LoraAdapter objects passed in are not modified.
    """
    adapters = []
    for path in paths:
        adapters.append(path if isinstance(path, LoraAdapter) else read_adapter(path))
        if on_read is not None:  # a progress bar
            on_read()
    if not adapters:
        raise NanPeftError("no adapters given")
    if not allow_duplicates:
        _refuse_duplicates(adapters)
    adapters = _unique_names(adapters)
    check_compatible(adapters, allow_different_bases)
    return adapters


def check_compatible(adapters: Sequence[LoraAdapter], allow_different_bases: bool = False) -> None:
    """Raise NanPeftError unless the adapters share a base model and agree on every shared module's shape."""
    bases = {a.base_model for a in adapters if a.base_model}
    if len(bases) > 1 and not allow_different_bases:
        listed = ", ".join(f"{a.name}: {a.base_model}" for a in adapters)
        raise NanPeftError(
            f"adapters were trained on different base models ({listed}); pass allow_different_bases / "
            "--allow-different-bases if they really share one"
        )
    carried: dict[str, tuple[str, torch.Tensor]] = {}
    for adapter in adapters:
        for key, tensor in adapter.extras.items():
            if key not in carried:
                carried[key] = (adapter.name, tensor)
            elif not torch.equal(carried[key][1], tensor):
                raise NanPeftError(
                    f"{carried[key][0]} and {adapter.name} carry different full weights for {key} "
                    "(a resized or retrained embedding?): they cannot be merged"
                )
    seen: dict[str, tuple[str, tuple]] = {}
    for adapter in adapters:
        for path, module in adapter.modules.items():
            if path not in seen:
                seen[path] = (adapter.name, module.signature)
            elif seen[path][1] != module.signature:
                other, signature = seen[path]
                raise NanPeftError(
                    f"module {path} has incompatible shapes: {_describe(signature)} in {other}, "
                    f"{_describe(module.signature)} in {adapter.name}"
                )


def _resolve(path: str | os.PathLike) -> Path:
    return resolve_folder(
        path, f"an adapter is a folder holding {CONFIG_NAME}", allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]
    )


_READ_ATTEMPTS = 3
_MAX_UPDATE_NORM = 1e150  # squared and summed over many modules and adapters, it still fits a float64


def _read_folder(folder: Path, label: str) -> tuple[dict, dict[str, LoraModule], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """The config, modules, carried and saved full tensors, and the sha256 of each file read (hashed from the
    bytes the reader parsed, so that the record names exactly what was merged)."""
    digests: dict[str, str] = {}
    config = _read_config(folder, label, digests)
    check_config(config, label)
    tensors = _read_tensors(folder, label, config, digests)
    extras = {key: tensors.pop(key) for key in list(tensors) if key.endswith(_CARRIED_SUFFIX)}
    saved = {key: tensors.pop(key) for key in list(tensors) if saved_module(key, config) is not None}
    modules = _modules_from_tensors(tensors, config, label)
    if not modules:
        raise NanPeftError(f"{label}: the adapter holds no LoRA weights")
    for key in extras:
        if not key.startswith(KEY_PREFIX) or key.removeprefix(KEY_PREFIX).removesuffix(_CARRIED_SUFFIX) not in modules:
            raise NanPeftError(f"{label}: unexpected tensor {key!r} (the full weight of a module the adapter does not adapt)")
    return config, modules, extras, saved, digests


def _file_states(folder: Path) -> tuple:
    """Identity of the files read (inode, size, mtime): a folder republished between reading the config and
    the weights (publish_folder swaps whole folders) changes it, and the read starts over."""
    states = []
    for name in (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME):
        try:
            stat = (folder / name).stat()
            states.append((stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        except OSError:
            states.append(None)
    return tuple(states)


def _display_name(path: str | os.PathLike) -> str:
    return Path(path).name or str(path)


def _read_config(folder: Path, label: str, digests: dict[str, str]) -> dict:
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise NanPeftError(f"{label}: missing {CONFIG_NAME}")
    try:
        data = file.read_bytes()
        digests[CONFIG_NAME] = hashlib.sha256(data).hexdigest()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise NanPeftError(f"{label}: {CONFIG_NAME} is unreadable ({first_line(error)})") from None
    try:
        config = json.loads(text)
    except ValueError as error:
        raise NanPeftError(f"{label}: {CONFIG_NAME} is not valid JSON ({first_line(error)})") from None
    except RecursionError:
        raise NanPeftError(f"{label}: {CONFIG_NAME} is nested too deeply to be an adapter config") from None
    if not isinstance(config, dict):
        raise NanPeftError(f"{label}: {CONFIG_NAME} is not a JSON object")
    return config


def _read_tensors(folder: Path, label: str, config: dict, digests: dict[str, str]) -> dict[str, torch.Tensor]:
    safetensors = folder / SAFETENSORS_NAME
    if safetensors.is_file():
        try:
            digests[SAFETENSORS_NAME] = _sha256_mapped(safetensors)
            with safe_open(safetensors, framework="pt") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise NanPeftError(f"{label}: {SAFETENSORS_NAME} is unreadable ({first_line(error)})") from None
        if CHECKSUM_KEY in metadata and metadata[CHECKSUM_KEY] != content_digest(tensors, config):
            raise NanPeftError(
                f"{label}: {SAFETENSORS_NAME} and {CONFIG_NAME} do not match the checksum nan-peft wrote "
                f"({CHECKSUM_KEY}): the adapter was corrupted or edited since"
            )
        return tensors
    pickle = folder / BIN_NAME
    if pickle.is_file():
        try:
            data = pickle.read_bytes()
            digests[BIN_NAME] = hashlib.sha256(data).hexdigest()
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses code; any failure is a bad file
            raise NanPeftError(f"{label}: {BIN_NAME} is unreadable or not plain tensors ({first_line(error)})") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
            raise NanPeftError(f"{label}: {BIN_NAME} is not a state dict of tensors")
        return tensors
    raise NanPeftError(f"{label}: missing {SAFETENSORS_NAME} (or {BIN_NAME})")


def _sha256_mapped(path: Path) -> str:
    """sha256 of a file through a read-only memory map: the pages safetensors maps next, no copy of its bytes.
    A file replaced between the two is caught by read_adapter's file-state check, which then reads again."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        return hashlib.sha256(mapped).hexdigest()


def _modules_from_tensors(tensors: dict[str, torch.Tensor], config: dict, label: str) -> dict[str, LoraModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = FACTOR_KEY.match(key)
        if match is None:
            raise NanPeftError(f"{label}: unexpected tensor {key!r} (only lora_A / lora_B factors are supported)")
        # Exactly the keys peft loads: any other form it skips, and the adapter is a no-op there in peft.
        expected = None if match["factor"].startswith("lora_embedding") else ".weight"
        if match["rest"] != expected or not key.startswith(KEY_PREFIX):
            form = f"{KEY_PREFIX}<module>.{match['factor']}{expected or ''}"
            raise NanPeftError(f"{label}: tensor {key!r} is not named as peft saves it ({form}); peft would not load it")
        module = match["module"].removeprefix(KEY_PREFIX)
        factors.setdefault(module, {})[match["factor"]] = tensor

    _check_targeted(factors, config, label)
    modules = {}
    for path in sorted(factors):
        found = factors[path]
        kind = "embedding" if "lora_embedding_A" in found or "lora_embedding_B" in found else "linear"
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
        if set(found) != {a_key, b_key}:
            raise NanPeftError(f"{label}: module {path} has {sorted(found)}; expected both {a_key} and {b_key}")
        A, B = found[a_key], found[b_key]
        modules[path] = _module(path, A, B, kind, config, label)
    return modules


def _check_targeted(factors: dict[str, dict[str, torch.Tensor]], config: dict, label: str) -> None:
    """Refuse factors peft would not load as saved (targeting.refusal: peft drops the factors of a module it
    does not wrap, so the adapter does nothing there in peft)."""
    kinds = {
        path: "embedding" if {"lora_embedding_A", "lora_embedding_B"} & set(found)
        else "conv" if any(t.dim() > 2 for t in found.values()) else "linear"
        for path, found in factors.items()
    }
    try:
        reason = refusal(kinds, config)
    except ConfigProblem as problem:
        raise NanPeftError(f"{label}: {CONFIG_NAME} has {problem}") from None
    if reason is not None:
        raise NanPeftError(f"{label}: {reason}")


def _module(path: str, A: torch.Tensor, B: torch.Tensor, kind: str, config: dict, label: str) -> LoraModule:
    if not (A.is_floating_point() and B.is_floating_point()):
        raise NanPeftError(f"{label}: module {path} has non-float factors ({A.dtype}, {B.dtype})")
    # float8 factors load into peft's float32 parameters; torch has little arithmetic for float8 itself
    A, B = (t.float() if t.element_size() == 1 else t for t in (A, B))
    if A.dim() > 2 or B.dim() > 2:
        kind = "conv" if kind == "linear" else kind
    if A.dim() < 2 or B.dim() < 2 or (kind == "embedding" and (A.dim(), B.dim()) != (2, 2)):
        raise NanPeftError(f"{label}: module {path} has factors of shapes {tuple(A.shape)} and {tuple(B.shape)}")
    r = A.shape[0]
    if B.shape[1] != r or any(d != 1 for d in B.shape[2:]):
        raise NanPeftError(
            f"{label}: module {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
            f"lora_B must be (out, {r}{', 1' * (B.dim() - 2)}) (grouped convolutions are not supported)"
        )
    expected_r = _pattern_value(config, "rank_pattern", path, config["r"])
    if r != expected_r:
        raise NanPeftError(f"{label}: module {path} has rank {r} but {CONFIG_NAME} says r={expected_r}")
    for factor, tensor in (("lora_A", A), ("lora_B", B)):
        if not all_finite(tensor):
            raise NanPeftError(f"{label}: module {path} {factor} holds NaN or Inf")
    alpha = _pattern_value(config, "alpha_pattern", path, config["lora_alpha"])
    scale = lora_scale(alpha, r, bool(config.get("use_rslora")))
    bound = scale * float(torch.linalg.vector_norm(A, dtype=torch.float64)) * float(torch.linalg.vector_norm(B, dtype=torch.float64))
    if not bound < _MAX_UPDATE_NORM:
        raise NanPeftError(
            f"{label}: module {path} has an update of norm up to {bound:.3g} (scale {scale:.3g}); its squared norm "
            "would overflow, so this cannot be a trained update"
        )
    return module_from_peft(A, B, scale, kind, bool(config.get("fan_in_fan_out")))


def _pattern_value(config: dict, field: str, path: str, default):
    """Per-module override, matched exactly as peft does (targeting.pattern_key, peft's get_pattern_key)."""
    pattern = config.get(field) or {}
    return pattern.get(pattern_key(list(pattern), path), default) if pattern else default


def _refuse_duplicates(adapters: Sequence[LoraAdapter]) -> None:
    for j, second in enumerate(adapters):
        for i, first in enumerate(adapters[:j]):
            if _same_update(first, second):
                raise NanPeftError(
                    f"inputs {i + 1} ({first.source or first.name}) and {j + 1} ({second.source or second.name}) are the "
                    "same adapter, so merging would silently double its weight; pass allow_duplicates=True / "
                    "--allow-duplicates to merge it twice anyway"
                )


def _same_update(a: LoraAdapter, b: LoraAdapter) -> bool:
    """The same modules with bit-identical factors and scales: the same adapter, wherever it was read from."""
    if a is b:
        return True
    if a.modules.keys() != b.modules.keys():
        return False
    for path, x in a.modules.items():
        y = b.modules[path]
        if (x.scale, x.kind, x.A.dtype, x.B.dtype, x.A.shape, x.B.shape) != (y.scale, y.kind, y.A.dtype, y.B.dtype, y.A.shape, y.B.shape):
            return False
    return all(torch.equal(x.A, b.modules[p].A) and torch.equal(x.B, b.modules[p].B) for p, x in a.modules.items())


def _unique_names(adapters: list[LoraAdapter]) -> list[LoraAdapter]:
    """Give adapters with the same name distinct names (unique_names) so reports stay unambiguous; renamed
    adapters are shallow copies, so the caller's objects keep their names."""
    names = unique_names([adapter.name for adapter in adapters])
    return [a if a.name == name else dataclasses.replace(a, name=name) for a, name in zip(adapters, names)]


def unique_names(names: Sequence[str]) -> list[str]:
    """The names, repeats made distinct as name#2, name#3, ... (skipping any name already taken)."""
    taken = set(names)
    seen: set[str] = set()
    unique = []
    for name in names:
        if name in seen:
            count = 2
            while f"{name}#{count}" in taken:
                count += 1
            name = f"{name}#{count}"
            taken.add(name)
        seen.add(name)
        unique.append(name)
    return unique


def _describe(signature: tuple) -> str:
    kind, out, fan_in, a_tail, _ = signature
    shape = f"{out}x{a_tail[0]}" + "".join(f"x{k}" for k in a_tail[1:]) if a_tail else f"{out}x{fan_in}"
    return f"{kind} {shape}"


