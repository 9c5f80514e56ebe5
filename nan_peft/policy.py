"""Which adapters are merged: a config must describe a plain LoRA update s * B @ A, with every field of the type
and range peft accepts; anything else is refused in one line that names the adapter, the field and why."""

from __future__ import annotations

import math
import re

from .errors import NanPeftError, one_line
from .errors import shown as _short
from .peft_format import CONFIG_NAME
from .targeting import ConfigProblem, check_fields

# peft's TaskType values (tests check them against the installed peft): checking a config against this list
# instead of importing peft keeps reading free of peft's and transformers' import time.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# init_lora_weights values whose training starts from a modified base model: the saved factors are not an
# update of the original base unless peft converted them on save (it then resets init_lora_weights).
# Not "mica": MiCA only sets B from the base's SVD and A to zero; the base stays as it is and the update is s*B@A.
_BASE_MODIFYING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
_MODULE_NAME = re.compile(r"[\w.\-]+")


def check_config(config: dict, label: str) -> None:
    """Raise NanPeftError, naming `label`, unless the config describes a plain LoRA update s * B @ A."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise NanPeftError(f"{label}: peft_type is {_short(peft_type)}; only LoRA adapters (peft_type 'LORA') can be merged")
    refusals = [
        (config.get("use_dora"), "DoRA adapters (use_dora) rescale the whole weight; their update is not s*B@A"),
        (config.get("lora_bias"), "lora_bias adapters carry a trained bias the merge would drop"),
        (config.get("bias", "none") != "none", f"bias={_short(config.get('bias'))} adapters carry trained biases the merge would drop"),
        (config.get("trainable_token_indices"), "adapters with trainable_token_indices carry token embeddings that cannot be averaged"),
        (config.get("target_parameters"), "adapters with target_parameters (LoRA on raw parameters) are not supported"),
        (config.get("alora_invocation_tokens"), "activated LoRA (alora_invocation_tokens) applies only after its invocation tokens"),
        (config.get("use_qalora"), "QA-LoRA adapters (use_qalora) pool their inputs; their update is not s*B@A"),
        (config.get("arrow_config"), "Arrow-routed adapters are not a single update"),
        (config.get("use_bdlora"), "block-diagonal LoRA (use_bdlora) saves its factors in a compact layout; their update is not s*B@A"),
        (config.get("kasa_config"), "KaSA adapters (kasa_config) truncate the base weight and add a learned diagonal; their update is not s*B@A"),
        (config.get("layer_replication"), "adapters with layer_replication adapt a model with repeated layers; their modules do not map onto the base"),
        (config.get("enable_lora"), "adapters with enable_lora are peft 0.2's MergedLinear format, which current peft cannot load"),
    ]
    for refused, why in refusals:
        if refused:
            raise NanPeftError(f"{label}: {why}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise NanPeftError(
            f"{label}: init_lora_weights={_short(init)} trains against a modified base model; save it with peft's "
            "path_initial_model_for_weight_conversion to get a plain LoRA update first"
        )
    # peft tuners/lora/layer.py update_layer: r sizes the factors (an int, `r <= 0` raises); alpha only scales
    if not _positive_int(config.get("r")):
        raise NanPeftError(f"{label}: {CONFIG_NAME} has r={_short(config.get('r'))}; expected a positive integer")
    if not _positive_number(config.get("lora_alpha")):
        raise NanPeftError(f"{label}: {CONFIG_NAME} has lora_alpha={_short(config.get('lora_alpha'))}; expected a positive number")
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), (bool, type(None))):
            raise NanPeftError(f"{label}: {CONFIG_NAME} has {key}={_short(config.get(key))}; expected true or false")
    for key in ("base_model_name_or_path", "revision", "task_type"):
        if not isinstance(config.get(key), (str, type(None))):
            raise NanPeftError(f"{label}: {CONFIG_NAME} has {key}={_short(config.get(key))}; expected a string")
    saved = config.get("modules_to_save")
    # a list (peft tuners/lora/config.py); peft iterates a string's characters as names (peft_model.py, utils/other.py)
    if saved and not (isinstance(saved, list) and all(isinstance(n, str) and _MODULE_NAME.fullmatch(n) for n in saved)):
        raise NanPeftError(f"{label}: {CONFIG_NAME} has modules_to_save ({_listed(saved)}); expected a list of module names")
    if config.get("task_type") is not None and config["task_type"] not in TASK_TYPES:
        raise NanPeftError(f"{label}: {CONFIG_NAME} has task_type={_short(config['task_type'])}, which peft does not know")
    for key in ("rank_pattern", "alpha_pattern"):
        # peft tuners/lora/model.py _create_and_replace calls .keys() on both (null or a list crashes it); a rank is r
        pattern, valid, expected = config.get(key, {}), (_positive_int if key == "rank_pattern" else _positive_number), (
            "a positive integer" if key == "rank_pattern" else "a positive number")
        if not isinstance(pattern, dict):
            raise NanPeftError(f"{label}: {CONFIG_NAME} has {key}={_short(pattern)}; expected an object mapping module patterns to numbers")
        for name, value in pattern.items():
            if not valid(value):
                raise NanPeftError(f"{label}: {CONFIG_NAME} has {key}[{_short(name)}]={_short(value)}; expected {expected}")
            try:
                re.compile(rf"(.*\.)?({name})$")
            except re.error as error:
                raise NanPeftError(f"{label}: {CONFIG_NAME} has {key} key {_short(name)}, not a valid pattern ({error})") from None
    try:
        check_fields(config)
    except ConfigProblem as problem:
        raise NanPeftError(f"{label}: {CONFIG_NAME} has {problem}") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    """A positive, finite int or float (not a bool); JSON allows NaN, Infinity and integers too large for a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return 0 < float(value) < math.inf
    except OverflowError:
        return False


def _listed(value) -> str:
    return one_line(", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
