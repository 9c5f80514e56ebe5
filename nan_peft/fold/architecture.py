"""What the model class a config.json names says about its weights: tied parameters, Conv1D layouts, and the
renames transformers applies to checkpoint keys on loading. transformers is imported only here, when called."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Architecture:
    """What the model class that config.json names says about its weights, beyond the checkpoint's headers."""

    tied: list[tuple[str, ...]]
    """Groups of parameter names that share one tensor."""
    transposed: frozenset[str]
    """Weights stored (in, out): transformers' Conv1D (GPT-2 style). peft decides fan_in_fan_out by this layer
    type, whatever the saved config says (a config may say false for an adapter that also targets lm_head)."""
    rename: Callable[[str], str | None] = lambda key: key
    """The name transformers gives a checkpoint key on loading (Llava's language_model.model.* loads as
    model.language_model.*, where peft's module paths point); None for a key it converts, not just renames."""
    linear: frozenset[str] = frozenset()
    """Weights of torch.nn.Linear layers, stored (out, in)."""
    embeddings: frozenset[str] = frozenset()
    """Weights of torch.nn.Embedding layers, stored (num_embeddings, dim)."""


def architecture(config: dict) -> Architecture | None:
    """The model config.json describes, built on the meta device (no memory); None when transformers cannot
    build that architecture."""
    import transformers
    from transformers import AutoConfig
    from transformers.pytorch_utils import Conv1D

    architectures = config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        return None
    try:
        config_object = AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = model_class(config_object)
    except Exception:  # an architecture this transformers cannot build: tying unknown, the caller decides
        return None
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    transposed = frozenset(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D))
    layers = {kind: frozenset(f"{name}.weight" for name, module in model.named_modules() if isinstance(module, kind))
              for kind in (torch.nn.Linear, torch.nn.Embedding)}
    return Architecture([tuple(names) for names in groups.values() if len(names) > 1], transposed, _loading_renames(model),
                        layers[torch.nn.Linear], layers[torch.nn.Embedding])


def _loading_renames(model) -> Callable[[str], str | None]:
    """transformers' renaming of checkpoint keys on loading (identity where this transformers has none)."""
    try:  # transformers 5
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]

        def rename(key: str) -> str | None:
            new, converter = rename_source_key(key, renamings, converters)
            return None if converter is not None else new

        return rename
    except Exception:  # transformers 4: a regex mapping on the class; the first pattern that matches renames
        mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}

        def rename(key: str) -> str | None:
            for pattern, replacement in mapping.items():
                new, count = re.subn(pattern, replacement, key)
                if count:
                    return new
            return key

        return rename


def tied_groups(config: dict) -> list[tuple[str, ...]] | None:
    """Groups of parameter names that share one tensor in the model config.json describes (see architecture)."""
    found = architecture(config)
    return None if found is None else found.tied
