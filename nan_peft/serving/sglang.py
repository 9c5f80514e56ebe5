"""SGLang, read from python/sglang/srt/lora/ (release 0.5.23): lora_config.py (LoRAConfig reads r, lora_alpha,
target_modules, use_dora and added_tokens.json), lora.py (scaling = lora_alpha / r: rsLoRA and the patterns are
not applied; normalize_qkv_proj stacks q/k/v into qkv_proj from each q_proj key, with v_proj required and a
missing k_proj zero; normalize_gate_up_proj stacks gate_proj with up_proj, a missing up_proj zero),
lora_manager.py (validate_new_adapter refuses DoRA and added tokens; an adapter must fit --max-lora-rank and
--lora-target-modules), utils.py (get_normalized_target_modules: a string target other than "all" /
"all-linear" is refused) and utils/common.py (SUPPORTED_LORA_TARGET_MODULES).
"""

from __future__ import annotations

from .facts import Facts, Finding, ModuleFacts, Profile, Target, language_model_findings, listed, scale_findings, unread_findings

SUPPORTED = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "kv_a_proj_with_mqa", "q_b_proj", "kv_b_proj", "wq_b", "wk",
     "weights_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj", "embed_tokens", "lm_head", "qkvr", "wo_ud"}
)


def config_scale(facts: Facts, module: ModuleFacts) -> float:
    return facts.config["lora_alpha"] / facts.config["r"]


def check(facts: Facts, target: Target) -> list[Finding]:
    found = unread_findings(facts, "SGLang")
    found += scale_findings(facts, "SGLang", config_scale, "lora_alpha/r everywhere (rsLoRA, rank_pattern and alpha_pattern are not applied)")
    found += language_model_findings(facts, "SGLang")
    targets = facts.config.get("target_modules")
    if isinstance(targets, str) and targets not in ("all", "all-linear"):
        found.append(Finding("error", f"SGLang refuses a string target_modules other than 'all' / 'all-linear' ({targets!r})"))
    unsupported = sorted(set(facts.types) - SUPPORTED)
    if unsupported:
        found.append(Finding("error", f"SGLang serves LoRA only on {', '.join(sorted(SUPPORTED))}; not on {', '.join(unsupported)}"))
    layers: dict[str, set[str]] = {}  # module path up to its type -> the q/k/v types present
    for path in facts.named("q_proj", "k_proj", "v_proj"):
        prefix, _, kind = path.rpartition(".")
        layers.setdefault(prefix, set()).add(kind)
    unstackable = sorted(prefix for prefix, kinds in layers.items() if not {"q_proj", "v_proj"} <= kinds)
    if unstackable:
        found.append(
            Finding("error", f"SGLang stacks q/k/v into qkv_proj from q_proj and v_proj (k_proj may be missing): {listed(unstackable)} lack one of them")
        )
    gates = {p.rpartition(".")[0] for p in facts.named("gate_proj")}
    orphans = sorted(p for p in facts.named("up_proj") if p.rpartition(".")[0] not in gates)
    if orphans:
        found.append(Finding("warning", f"SGLang serves up_proj stacked with gate_proj; alone ({listed(orphans)}) it loads only for models with an ungated MLP"))
    if "added_tokens.json" in facts.files:
        found.append(Finding("warning", "SGLang refuses adapters that add tokens (added_tokens.json with ids past the base model's vocabulary)"))
    types = " ".join(sorted(facts.types))
    found.append(Finding("info", f"start SGLang with --enable-lora --max-lora-rank {facts.rank} --lora-target-modules {types} --lora-paths merged={facts.where}"))
    return found


PROFILE = Profile("sglang", "SGLang", check, package="sglang")
