"""Would peft apply a saved LoRA factor at its module, and if not, which config rule says no.

peft's PeftModel.from_pretrained builds a fresh LoraConfig from adapter_config.json, wraps the base model's modules
that its rules pick, and loads the saved state dict with strict=False (peft utils/save_and_load.py
set_peft_model_state_dict): factors saved for a module it did not wrap are silently dropped, and the adapter does
nothing there. Reading them would merge an update the adapter never makes in peft, so the reader refuses them.

The rules are peft's own, applied to the saved module paths alone (no model, no peft import): a saved key
`base_model.model.<path>.lora_A.weight` is a factor of the base model's module `<path>`, which is the name peft
matches (it runs its rules over the base model's named_modules(), without "base_model.model."). Some rules need
the model; they are settled as far as the saved factors tell and said where they apply: "all-linear" (Linear or
Conv1D layers, told by the factors' shapes; the output layer, told by transformers' names for it),
ensure_weight_tying (which modules the model ties: not checked), a null target_modules (peft's per-architecture
default: refused), and modules_to_save naming a module the file does not hold (peft fails on the missing weight
only where the model has that module: not checked).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from .errors import one_line
from .errors import shown as _shown

ALL_LINEAR = "all-linear"  # peft utils/constants.py INCLUDE_LINEAR_LAYERS_SHORTHAND, compared lower-cased
# Heads peft's task model classes add to modules_to_save before injecting the adapter (peft peft_model.py,
# PeftModelForSequenceClassification / ForTokenClassification / ForQuestionAnswering __init__).
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# The names transformers gives the output layer (PreTrainedModel.get_output_embeddings) that "all-linear" leaves out;
# other names need the model and are not checked.
_OUTPUT_LAYERS = ("lm_head", "embed_out")


class ConfigProblem(ValueError):
    """A field peft's LoraConfig or loader would reject or crash on, as 'field=value; expected ...'."""


def pattern_key(patterns, path: str) -> str:
    """The rank_pattern / alpha_pattern key that applies at `path` (the first that matches), or `path` itself:
    peft utils/other.py get_pattern_key."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return path


def refusal(kinds: Mapping[str, str], config: Mapping) -> str | None:
    """Why peft would not load an adapter's saved factors as they are, or None. `kinds` maps each saved module
    path (without "base_model.model.") to its layer kind ("linear", "conv", "embedding"); the config must pass
    check_fields. ConfigProblem for a regex peft could not compile."""
    if config.get("ensure_weight_tying"):
        return None  # peft retargets the modules the model ties (tuners/lora/model.py _add_targets_to_tie): needs the model
    unloaded = []
    for path in sorted(kinds):
        reason = why_not_loaded(path, kinds[path], config)
        if reason is not None:
            unloaded.append((path, reason))
        container = targeted_container(path, config)
        if container is not None:
            return (f"its target rules also pick {container}, the module holding {path}; peft cannot put LoRA on a "
                    "module that holds others and refuses the adapter")
    if not unloaded:
        return None
    path, reason = unloaded[0]
    none = "peft would load none of its factors: " if len(unloaded) == len(kinds) else ""
    return f"{none}it holds factors for {path}, which {reason}; peft would not load them"


def check_fields(config: Mapping) -> None:
    """Raise ConfigProblem unless the targeting fields have the types peft accepts and a combination its
    LoraConfig.__post_init__ allows (peft tuners/lora/config.py)."""
    targets = config.get("target_modules")
    if targets is None:
        # peft tuners/lora/model.py _prepare_adapter_config: None means the model type's default targets; peft
        # saves the targets it used as a list, so only an edited config says null
        raise ConfigProblem(
            "target_modules=None; expected a list of module names or a regex (peft would pick defaults from the "
            "base model's architecture, which the adapter does not record)"
        )
    _check_names(config, "target_modules")
    _check_names(config, "exclude_modules")
    layers = config.get("layers_to_transform")
    # peft tuners/lora/config.py: layers_to_transform is an int or a list of ints (tuners_utils.py
    # check_target_module_exists compares them with == and `in`; a string or float there crashes or matches nothing)
    if layers is not None and not (_is_int(layers) or (isinstance(layers, list) and all(_is_int(i) for i in layers))):
        raise ConfigProblem(f"layers_to_transform={_shown(layers)}; expected a layer index or a list of them")
    pattern = config.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(p, str) for p in pattern))):
        raise ConfigProblem(f"layers_pattern={_shown(pattern)}; expected a name or a list of names")
    # peft tuners/lora/config.py LoraConfig.__post_init__
    if isinstance(targets, str) and layers is not None:
        raise ConfigProblem(f"layers_to_transform={_shown(layers)} with a regex target_modules, which peft refuses")
    if isinstance(targets, str) and pattern is not None:
        raise ConfigProblem(f"layers_pattern={_shown(pattern)} with a regex target_modules, which peft refuses")
    if pattern and layers is None:
        raise ConfigProblem(f"layers_pattern={_shown(pattern)} without layers_to_transform, which peft refuses")
    tying = config.get("ensure_weight_tying")
    if not isinstance(tying, (bool, type(None))):
        raise ConfigProblem(f"ensure_weight_tying={_shown(tying)}; expected true or false")


def _check_names(config: Mapping, field: str) -> None:
    """target_modules / exclude_modules: a list of names, or one string that peft full-matches as a regex
    (peft tuners/lora/config.py annotations; tuners_utils.py check_target_module_exists)."""
    value = config.get(field)
    if value is None or (isinstance(value, list) and all(isinstance(name, str) for name in value)):
        return
    if not isinstance(value, str):
        raise ConfigProblem(f"{field}={_shown(value)}; expected a list of module names or a regex")
    if field == "target_modules" and value.lower() == ALL_LINEAR:
        return
    try:
        re.compile(value)
    except (re.error, RecursionError, OverflowError) as error:
        raise ConfigProblem(f"{field}={_shown(value)}, not a valid regex ({error})") from None


def why_not_loaded(path: str, kind: str, config: Mapping) -> str | None:
    """None when peft wraps the module `path` (no "base_model.model.") for this config, so that its saved
    factors load; otherwise the rule that leaves it out, as a clause ("target_modules (q_proj) does not name").
    `kind` is the factors' layer kind: "linear", "conv" or "embedding" ("container" for a module that holds
    others, see targeted_container). The config must pass check_fields;
    ConfigProblem for a regex peft could not compile. Follows peft tuners/tuners_utils.py
    check_target_module_exists, step by step."""
    excluded = config.get("exclude_modules")
    if excluded:  # first, and even for a module target_modules names exactly
        if isinstance(excluded, str):
            if re.fullmatch(excluded, path):
                return f"exclude_modules {_shown(excluded)} full-matches"
        elif _names(path, excluded):
            return f"exclude_modules ({_listed(excluded)}) names"
    saved = list(config.get("modules_to_save") or ()) + list(TASK_HEADS.get(config.get("task_type"), ()))
    for name in saved:  # peft never adapts a module inside a modules_to_save module (a regex, unescaped, in peft)
        try:
            inside = re.match(rf"(^|.*\.){name}($|\..*)", path)
        except re.error as error:
            raise ConfigProblem(f"modules_to_save entry {_shown(name)}, not a valid pattern ({error})") from None
        if inside:
            return f"lies in modules_to_save module {_shown(name)} (peft never adapts those)"
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        # peft tuners/tuners_utils.py _maybe_include_all_linear_layers: every Linear / Conv1D but the output layer
        if kind != "linear":
            return f"is a{'n' if kind == 'embedding' else ''} {kind} layer, and target_modules {_shown(targets)} adapts Linear and Conv1D layers only"
        if path.rpartition(".")[2] in _OUTPUT_LAYERS:
            return f"is the output layer, which target_modules {_shown(targets)} leaves out"
        return None
    if isinstance(targets, str):
        if re.fullmatch(targets, path):
            return None
        return f"target_modules {_shown(targets)} does not full-match (peft matches a string target with re.fullmatch)"
    if path in _name_set(tuple(targets)):  # an exact name: no layer rule applies
        return None
    if not _names(path, targets):
        return f"target_modules ({_listed(targets)}) does not name"
    return _outside_layers(path, config)


def targeted_container(path: str, config: Mapping) -> str | None:
    """The first module holding `path` (its ancestors, outermost first, as peft walks named_modules()) that
    the config also targets, or None. Such a module holds other modules, so it is no layer type LoRA wraps
    (Linear, Embedding, Conv, Conv1D): peft raises "Target module ... is not supported" and loads nothing
    (peft tuners/lora/model.py _create_new_module). A regex such as ".*" or a name such as "self_attn" does it."""
    parts = path.split(".")
    targets = config.get("target_modules")
    for end in range(1, len(parts)):
        ancestor = ".".join(parts[:end])
        if isinstance(targets, list) and not _names(ancestor, targets):
            continue  # the answer why_not_loaded gives, without building its reason
        if why_not_loaded(ancestor, "container", config) is None:
            return ancestor
    return None


def _outside_layers(path: str, config: Mapping) -> str | None:
    """peft tuners/tuners_utils.py check_target_module_exists, its layers_to_transform / layers_pattern part: the
    first numbered path segment after a named one (or after a layers_pattern name) is the layer index."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    patterns = config.get("layers_pattern")
    match = None
    if not patterns:  # None, "" or []: any layer name
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            try:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            except re.error as error:
                raise ConfigProblem(f"layers_pattern={_shown(patterns)}, not a valid pattern ({error})") from None
            if match is not None:
                break
    where = f"layers_to_transform {_shown(layers)}" + (f" with layers_pattern {_shown(patterns)}" if patterns else "")
    if match is None:
        return f"has no layer index that peft finds for {where}"
    index = int(match["idx"])
    if index == layers if isinstance(layers, int) else index in layers:
        return None
    return f"is in layer {index}, which {where} leaves out"


def _names(path: str, names: list[str]) -> bool:
    """`path` is one of `names` or ends with ".name" for one of them (peft tuners/tuners_utils.py
    check_target_module_exists: `key == target_key or key.endswith(f".{target_key}")`), tested by looking up each
    dot-separated suffix of the path in a set: a 224-name list checked over a model's modules was 50 ms a read."""
    named = _name_set(tuple(names))
    return path in named or any(path[i + 1:] in named for i, char in enumerate(path) if char == ".")


@functools.lru_cache(maxsize=16)
def _name_set(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _listed(value) -> str:
    return one_line(", ".join(map(str, value)))
