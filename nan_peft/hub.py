"""Hugging Face Hub references: `org/name`, `org/name@revision`, `org/name/subfolder`, `org/name/subfolder@revision`.

A reference is fetched with huggingface_hub's snapshot_download, which returns the cached snapshot folder
`<cache>/models--org--name/snapshots/<commit>/` (huggingface_hub/_snapshot_download.py: the folder is always
named by the resolved commit, online or from `refs/<revision>` offline). The commit is read back from that
path, so a merge record can pin exactly what was read without keeping any state between reading and recording.
huggingface_hub is imported only here, and only when it is needed (it is light: no torch, peft or transformers).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from .errors import NanPeftError

HUB_URL = "https://huggingface.co"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REVISION = re.compile(r"^[^\s@]+$")


@dataclasses.dataclass(frozen=True)
class HubRef:
    """A model repository on the Hub, at `revision` (None: the default branch), optionally one `subfolder` of it."""

    repo_id: str
    revision: str | None = None
    subfolder: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"/{self.subfolder}" if self.subfolder else "") + (f"@{self.revision}" if self.revision else "")

    def url(self, commit: str | None = None) -> str:
        """The web page of the referenced folder, at `commit` when known (a link that never moves)."""
        at = commit or self.revision
        if not at and not self.subfolder:
            return f"{HUB_URL}/{self.repo_id}"
        return f"{HUB_URL}/{self.repo_id}/tree/{at or 'main'}" + (f"/{self.subfolder}" if self.subfolder else "")


def parse(text) -> HubRef | None:
    """The Hub reference `text` spells, or None when it is not one.

    `org/name` is required (a bare `name` is far more often a local folder than one of the Hub's legacy
    un-namespaced ids); org and name follow huggingface_hub's validate_repo_id (the Hub's own naming rules);
    a subfolder is one or more path components after the name, none of them empty, "." or "..";
    a revision (branch, tag or commit, `refs/pr/1` too) follows the first "@".
    """
    if not isinstance(text, str) or text != text.strip():
        return None
    main, at, revision = text.partition("@")
    if at and not _REVISION.match(revision):
        return None
    parts = main.split("/")
    if len(parts) < 2 or any(part in ("", ".", "..") for part in parts):
        return None
    repo_id = "/".join(parts[:2])
    if not is_repo_id(repo_id):
        return None
    return HubRef(repo_id, revision or None, "/".join(parts[2:]) or None)


def is_repo_id(text) -> bool:
    """True for a model id of the form `org/name` that huggingface_hub's validate_repo_id accepts."""
    if not isinstance(text, str) or text.count("/") != 1:
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def model_id(text) -> str | None:
    """`text` when it names a Hub model (an `org/name` id that is not a folder here), else None.

    This is what may go into a model card's `base_model`: the Hub validates the card's metadata on push, and
    `base_model` "must be the ID of a model on the Hub" (huggingface_hub ModelCardData's docstring;
    hub-docs model-cards.md, "Specifying a base model"); a local path there makes the push fail
    (transformers PR #28482 "Don't set `finetuned_from` if it is a local path", issue #33922).
    """
    if not is_repo_id(text) or os.path.exists(text):
        return None
    return text


def resolve(ref: HubRef, allow_patterns=None, ignore_patterns=None) -> Path:
    """Fetch (or find in the cache) the referenced folder with snapshot_download; return the local folder.

    Patterns are relative to the subfolder, as for a local folder: they are prefixed with it, and only files
    under it are fetched. Errors from the Hub (network, auth, missing repo, revision or files) propagate.
    """
    from huggingface_hub import snapshot_download

    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    allow = [prefix + p for p in _listed(allow_patterns)] or ([prefix + "*"] if prefix else None)
    ignore = [prefix + p for p in _listed(ignore_patterns)] or None
    snapshot = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=allow, ignore_patterns=ignore))
    folder = snapshot / ref.subfolder if ref.subfolder else snapshot
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {ref.subfolder!r} in {ref.repo_id} at {snapshot.name}")
    return folder


def resolve_folder(path: str | os.PathLike, what: str, **patterns) -> Path:
    """A local folder, or else a Hub reference (`org/name`, `org/name@revision`, `org/name/subfolder[@revision]`)
    fetched through huggingface_hub (`patterns`: snapshot_download's allow_patterns / ignore_patterns, relative
    to the subfolder); NanPeftError in one line otherwise. A local folder always wins, whatever its path looks
    like. `what` says what the folder holds."""
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise NanPeftError(f"{path}: not a folder ({what})")
    ref = parse(path) if isinstance(path, str) else None
    if ref is None:
        raise NanPeftError(f"{path}: no such folder")
    try:
        return resolve(ref, **patterns)
    except Exception as error:  # network, auth, missing repo / revision / subfolder: one line either way
        raise NanPeftError(f"{path}: no such folder, and fetching it from the Hub failed ({type(error).__name__})") from None


def provenance(text, folder: str | os.PathLike) -> dict | None:
    """{"repo_id", "revision", "commit", "subfolder"} when `folder` is the snapshot of the Hub reference `text`
    (as resolve returns it: `.../models--org--name/snapshots/<commit>[/subfolder]`), else None (a local folder,
    whatever its name looks like)."""
    ref = parse(text)
    if ref is None:
        return None
    parts = Path(folder).parts
    tail = tuple(ref.subfolder.split("/")) if ref.subfolder else ()
    if tail and parts[-len(tail):] != tail:
        return None
    parts = parts[: len(parts) - len(tail)]
    storage = "models--" + ref.repo_id.replace("/", "--")  # huggingface_hub file_download.repo_folder_name
    if len(parts) < 3 or parts[-3:-1] != (storage, "snapshots") or not _COMMIT.match(parts[-1]):
        return None
    return {"repo_id": ref.repo_id, "revision": ref.revision, "commit": parts[-1], "subfolder": ref.subfolder}


def _listed(patterns) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)
