"""A base model's safetensors checkpoint: headers read without loading tensors, and the raw file I/O the
streaming fold uses (positioned reads, kernel-side copies, whole writes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NanPeftError, first_line
from ..hub import resolve_folder

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MODEL_CONFIG_NAME = "config.json"
# Files that hold weights (in any format): never copied into the output, where they would be stale.
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf|onnx|npz)(\.index\.json)?$")
# Bytes per element of the safetensors dtypes; a folded weight must be one of FLOATS.
ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file, from its header: where its bytes lie (absolute file offsets)."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass
class Checkpoint:
    """A base model's safetensors weights: one file, or shards listed by an index."""

    folder: Path
    files: list[str]
    tensors: dict[str, StoredTensor]
    file_metadata: dict[str, dict[str, str]]
    index_metadata: dict | None = None
    """The index's "metadata" (None for a single-file model)."""

    @property
    def sharded(self) -> bool:
        return self.index_metadata is not None


def resolve_base(base: str | os.PathLike) -> Path:
    """The base model's folder: a local folder, or a Hub id fetched (weights in safetensors only)."""
    return resolve_folder(
        base,
        f"the base model is a folder holding {MODEL_CONFIG_NAME} and safetensors weights",
        ignore_patterns=["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "original/*"],
    )


def read_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Headers of a base model's safetensors weights; refuse missing shards, bad headers and .bin-only models."""
    folder = Path(folder)
    index_file = folder / INDEX_NAME
    if index_file.is_file():
        index = read_json(index_file, f"{folder.name}/{INDEX_NAME}")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise NanPeftError(f"{folder}: {INDEX_NAME} has no weight_map of tensor names to shard files")
        files = list(dict.fromkeys(weight_map.values()))
        index_metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    elif (folder / WEIGHTS_NAME).is_file():
        weight_map, files, index_metadata = None, [WEIGHTS_NAME], None
    else:
        others = sorted(p.name for p in folder.glob("*") if WEIGHT_FILE.fullmatch(p.name))
        found = f" (found {', '.join(others[:3])})" if others else ""
        raise NanPeftError(
            f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}{found}; nan-peft needs safetensors weights to fold into or merge a full model "
            "(convert a .bin model with transformers: from_pretrained(...).save_pretrained(..., safe_serialization=True))"
        )
    tensors, file_metadata = {}, {}
    for file in files:
        path = folder / file
        if Path(file).name != file:
            raise NanPeftError(f"{folder}: {INDEX_NAME} lists shard {file!r}, which is not a file name in the folder")
        if not path.is_file():
            raise NanPeftError(f"{folder}: shard {file} listed in {INDEX_NAME} is missing")
        metadata, entries = read_header(path)
        file_metadata[file] = metadata
        for name, entry in entries.items():
            if name in tensors:
                raise NanPeftError(f"{folder}: tensor {name} is stored in both {tensors[name].file} and {file}")
            tensors[name] = entry
    if weight_map is not None:
        for name, file in weight_map.items():
            if tensors.get(name) is None or tensors[name].file != file:
                raise NanPeftError(f"{folder}: {INDEX_NAME} lists {name} in {file}, but that shard does not hold it")
    return Checkpoint(folder, files, tensors, file_metadata, index_metadata)


def read_header(path: Path) -> tuple[dict[str, str], dict[str, StoredTensor]]:
    """The metadata and tensor entries of a safetensors file, checked against its size."""
    label = f"{path.parent.name}/{path.name}"
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise NanPeftError(f"{label}: not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise NanPeftError(f"{label}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise NanPeftError(f"{label}: not a safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NanPeftError(f"{label}: not a safetensors file (__metadata__ is not a map of strings)")
    start, entries, spans = 8 + length, {}, []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            valid = isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)) and begin <= end
        except (KeyError, TypeError, ValueError):
            valid = False
        numel = 1
        for d in shape if valid else ():
            numel *= d
        if not valid or start + end > size or (dtype in ITEMSIZE and end - begin != numel * ITEMSIZE[dtype]):
            raise NanPeftError(f"{label}: tensor {name} has a bad header entry or lies past the end of the file (truncated?)")
        entries[name] = StoredTensor(path.name, dtype, shape, start + begin, start + end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise NanPeftError(f"{label}: tensors {first} and {second} overlap")
    return metadata, entries


def read_json(path: Path, label: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise NanPeftError(f"{label}: unreadable ({first_line(error)})") from None


def copy_other_files(folder: Path, tmp: Path) -> None:
    """Copy the base folder's top-level files that are not weights (tokenizer, generation config, ...)."""
    for source in sorted(folder.iterdir()):
        name = source.name
        if name.startswith(".") or name == MODEL_CONFIG_NAME or WEIGHT_FILE.fullmatch(name) or not source.is_file():
            continue
        shutil.copyfile(source, tmp / name)


def flush(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def read_into(fd: int, data: torch.Tensor, offset: int, path: Path) -> None:
    view, done = memoryview(data.numpy()), 0
    while done < len(view):
        read = os.preadv(fd, [view[done:]], offset + done)
        if read <= 0:
            raise NanPeftError(f"{path}: truncated while reading")
        done += read


def read_tensor(fd: int, entry: StoredTensor, path: Path) -> torch.Tensor:
    data = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
    read_into(fd, data, entry.begin, path)
    return data.view(FLOATS[entry.dtype]).reshape(entry.shape)


class TensorReader:
    """A checkpoint's float tensors read one at a time by name (positioned reads; each shard opened once, on
    first use): nothing but the tensor asked for is ever in memory. Use as a context manager."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint, self._fds = checkpoint, {}

    def read(self, name: str) -> torch.Tensor:
        entry = self.checkpoint.tensors[name]
        return read_tensor(self._fd(entry.file), entry, self.checkpoint.folder / entry.file)

    def blocks(self, name: str, count: int):
        """Tensor `name` flattened, `count` entries at a time (the last block shorter): never whole in memory."""
        entry = self.checkpoint.tensors[name]
        step = count * ITEMSIZE[entry.dtype]
        for start in range(entry.begin, entry.end, step):
            data = torch.empty(min(step, entry.end - start), dtype=torch.uint8)
            read_into(self._fd(entry.file), data, start, self.checkpoint.folder / entry.file)
            yield data.view(FLOATS[entry.dtype])

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.checkpoint.folder / file, os.O_RDONLY)
        return self._fds[file]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_header(tensors, metadata: dict[str, str] | None) -> tuple[bytes, int]:
    """(the header bytes, the data's total bytes) of a safetensors file holding `tensors` [(name, dtype, shape,
    bytes)] back to back in that order: the JSON's length as a little-endian u64, then the JSON padded with spaces to
    a multiple of 8 bytes, as safetensors writes it."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, size in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def write_model_files(folder: Path, config: dict, index_metadata: dict | None, weight_map: dict[str, str]) -> None:
    """Beside shards written to `folder`: the index (with `index_metadata`, for a sharded checkpoint; None for one
    file) mapping each tensor to its shard, and config.json."""
    if index_metadata is not None:
        index = {"metadata": index_metadata, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / MODEL_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_range(src: int, dst: int, offset: int, length: int, path: Path) -> None:
    """Append `length` bytes of `src` from `offset` to `dst`: in the kernel where it can, else in chunks."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                copied = os.copy_file_range(src, dst, length - done, offset + done)
                if copied <= 0:
                    break
                done += copied
        except OSError:
            pass
    while done < length:
        chunk = os.pread(src, min(length - done, 64 << 20), offset + done)
        if not chunk:
            raise NanPeftError(f"{path}: truncated while copying")
        write_all(dst, chunk)
        done += len(chunk)


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return numel


def shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"
