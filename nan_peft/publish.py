"""Atomic publication of an output folder: written into a temporary sibling, synced, and renamed into place in
one step (never half-written, never over an input, never over an existing folder unless asked), with the checks
that refuse an output before any work is done. Used for adapters, GGUF files and folded models alike."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import NanPeftError

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
"""This host, in the names of publish_folder's temporaries: only this host can tell whether their writer lives."""


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
