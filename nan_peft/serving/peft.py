"""peft loads every LoRA variant. It warns about config keys the installed version does not know (they are
ignored), and AutoPeftModel needs base_model_name_or_path. The known keys are read from the installed peft's
source (the dataclass fields of LoraConfig and its bases) without importing it: importing peft imports
transformers, seconds that `nan-peft merge` and `inspect` do not spend."""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
from pathlib import Path

from .facts import Facts, Finding, Profile, Target, version_tuple

# (file under the peft package, class) whose annotated fields a LoraConfig has: peft/tuners/lora/config.py, peft/config.py
CONFIG_CLASSES = (("tuners/lora/config.py", "LoraConfig"), ("config.py", "PeftConfig"), ("config.py", "PeftConfigMixin"))


@functools.lru_cache(maxsize=1)
def installed() -> tuple[str, frozenset[str]] | None:
    """The installed peft's version and LoraConfig's field names, or None when peft cannot be found or read."""
    try:
        spec = importlib.util.find_spec("peft")
        version = importlib.metadata.version("peft")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    fields = set()
    try:
        for file, name in CONFIG_CLASSES:
            tree = ast.parse((root / file).read_text(encoding="utf-8"))
            body = next(node.body for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)
            fields |= {node.target.id for node in body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    except (OSError, SyntaxError, StopIteration):
        return None
    return version, frozenset(fields)


def check(facts: Facts, target: Target) -> list[Finding]:
    found = []
    known = installed()
    if known is not None:
        version, fields = known
        unknown = sorted(set(facts.config) - fields)
        if unknown:
            found.append(Finding("warning", f"peft {version} does not know the config key(s) {', '.join(unknown)} and ignores them"))
        saved = facts.config.get("peft_version")
        if isinstance(saved, str) and version_tuple(saved) > version_tuple(version):
            found.append(Finding("warning", f"saved with peft {saved}, newer than the installed {version}"))
    if not facts.config.get("base_model_name_or_path"):
        found.append(Finding("warning", "no base_model_name_or_path: pass the base model to PeftModel.from_pretrained yourself"))
    return found


PROFILE = Profile("peft", "peft", check, package="peft")
