"""Write a LoRA adapter that peft and serving engines load as is, and publish folders atomically."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import NanPeftError
from .gram import pad_rank
from .lora import FACTOR_KEYS, KEY_PREFIX, LoraAdapter
from .peft_format import CHECKSUM_KEY, CONFIG_NAME, SAFETENSORS_NAME, content_digest

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
"""This host, in the names of publish_folder's temporaries: only this host can tell whether their writer lives."""


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
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
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


def publish_folder(
    folder: str | os.PathLike,
    write: Callable[[Path], None],
    overwrite: bool = False,
    protected: Sequence[str | os.PathLike] = (),
) -> Path:
    """Create `folder` by calling write(tmp) on a temporary sibling, then renaming it into place.

    A reader (a server hot-swapping adapters) sees the old folder or the complete new one, never a partial
    one: on Linux an existing folder is swapped in one renameat2(RENAME_EXCHANGE); elsewhere the old folder
    is moved aside first. If `write` fails, nothing is left behind and an existing folder is untouched.
    The temporary sibling is a hidden `.NAME.<host>-<pid>-<random>.tmp` folder; a process killed mid-write
    leaves it behind, and the next publish of the same folder from this host removes it once its process is
    gone. `folder` may not be, contain or sit inside a `protected` folder (the inputs of a merge).
    """
    _refuse_protected(Path(folder), protected)
    remove_stale_temporaries(folder)  # may put back an output a killed swap left aside
    folder = check_output(folder, overwrite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=folder.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        # mkdtemp makes the folder 0700 and safetensors its files 0600: readable by a server of another user
        for path in (tmp, *tmp.rglob("*")):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        _sync(tmp)  # after the modes, so that they are durable too
        if folder.exists():
            _swap_in(tmp, folder)
            _remove(tmp)  # now holds the old contents
        else:
            os.rename(tmp, folder)
        _sync_folder(folder.parent)
    except BaseException:
        _remove(tmp)
        raise
    return folder


def check_output(folder: str | os.PathLike, overwrite: bool = False, force: str = "overwrite=True / --force") -> Path:
    """The output folder as an absolute path, after refusing what cannot be written: an existing one without
    `overwrite` (`force` names the way to allow it), a file or a broken link (never replaced), the current
    folder, a place under a file or where this user may not write. Called before any work, so that a merge does
    not fail only at its end."""
    given, folder = folder, Path(os.path.abspath(folder))
    if folder == Path.cwd() or folder.parent == folder:
        raise NanPeftError(f"{given} is the current folder (or the root): write the output into a new folder")
    if folder.is_symlink() and not folder.exists():
        raise NanPeftError(f"{given} is a broken symbolic link: remove it or choose another output folder")
    if folder.exists() and not folder.is_dir():
        raise NanPeftError(f"{given} is a file: the output is a folder, and a file is never replaced; choose another name")
    if folder.exists() and not overwrite:
        raise NanPeftError(f"{given} already exists; pass {force} to replace it")
    ancestor = folder.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NanPeftError(f"cannot write {given}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise NanPeftError(f"cannot write {given}: no permission to write in {ancestor}")
    return folder


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings publish_folder left for `folder` when its process was killed: those made
    on this host by a process that no longer runs. Live writers' folders and other hosts' are kept. If a
    killed swap left the old contents aside (`.old`, non-Linux fallback) and `folder` is gone, they are
    put back. Returns the paths removed or restored."""
    folder = Path(folder)
    pattern = re.compile(rf"^\.{re.escape(folder.name)}\.{_HOST}-(\d+)-[^/]*\.tmp(\.old)?$")
    handled = []
    try:
        siblings = sorted(folder.parent.iterdir())
    except OSError:
        return handled
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match is None or _alive(int(match[1])):
            continue
        if match[2] and not folder.exists():
            try:
                os.rename(sibling, folder)
            except OSError:
                continue  # never delete old contents we could not put back
        else:
            _remove(sibling)
        handled.append(sibling)
    return handled


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _refuse_protected(folder: Path, protected: Sequence[str | os.PathLike]) -> None:
    target = folder.resolve()
    for path in protected:
        if not path:
            continue
        guarded = Path(path).resolve()
        if target == guarded or guarded in target.parents or target in guarded.parents:
            raise NanPeftError(f"output folder {folder} would replace or write into input {path}; choose another output folder")


def check_file_names(names, reserved: Sequence[str] = ()) -> None:
    """Refuse extra file names that are not plain names in the output folder (no separators, no "..") or
    that would replace one of the `reserved` files written there."""
    for name in names:
        if not _plain_file_name(name) or name in reserved:
            others = f" other than {', '.join(reserved)}" if reserved else ""
            raise NanPeftError(f"extra file name {name!r} must be a plain file name{others}")


def write_files(folder: Path, files: Mapping[str, str | bytes]) -> None:
    """Write {name: text or bytes} into `folder` (names checked by check_file_names first)."""
    check_file_names(files)
    for name, content in files.items():
        target = folder / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content, encoding="utf-8")


def _plain_file_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _sync(folder: Path) -> None:
    """fsync every file and folder under `folder`, so that a rename never publishes data still in flight."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _sync_folder(Path(root))


def _sync_folder(folder: Path) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on folders
    finally:
        os.close(handle)


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
