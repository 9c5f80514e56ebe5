"""TensorRT-LLM, read from tensorrt_llm/lora_manager.py:
- HF_LORA_PATTERN / iterate_hf_lora: a factor's key must read <prefix>.<layer>.<module prefix>.<module>;
  keys that do not and name lm_head or embed_tokens are skipped silently, others raise; the module must be
  in get_default_trtllm_modules_to_hf_modules (below, inverted);
- load_from_hf scales each module by lora_alpha / the rank of its factors (/ sqrt with use_rslora):
  alpha_pattern is not applied; biases and modules_to_save are not read at run time;
- max_lora_rank is fixed when the engine is built (LoraConfig default 64).
"""

from __future__ import annotations

import math

from .facts import Facts, Finding, ModuleFacts, Profile, Target, language_model_findings, layer_index, listed, scale_findings, unread_findings

MODULES = {  # HF module -> TensorRT-LLM LoRA module
    "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_dense",
    "gate_proj": "mlp_h_to_4h", "down_proj": "mlp_4h_to_h", "up_proj": "mlp_gate", "gate_up_proj": "mlp_gate_up",
    "w1": "moe_h_to_4h", "w2": "moe_4h_to_h", "w3": "moe_gate", "gate": "moe_router",
}  # fmt: skip
DEFAULT_MAX_LORA_RANK = 64


def per_rank_scale(facts: Facts, module: ModuleFacts) -> float:
    alpha = facts.config["lora_alpha"]
    return alpha / math.sqrt(module.rank) if facts.rslora else alpha / module.rank


def check(facts: Facts, target: Target) -> list[Finding]:
    found = unread_findings(facts, "TensorRT-LLM")
    found += scale_findings(facts, "TensorRT-LLM", per_rank_scale, "lora_alpha / the rank of each module (alpha_pattern is not applied)")
    found += language_model_findings(facts, "TensorRT-LLM")
    skipped = facts.named("lm_head", "embed_tokens")
    if skipped:
        found.append(Finding("error", f"TensorRT-LLM skips LoRA on lm_head / embed_tokens silently ({listed(skipped)})"))
    unmapped = sorted(p for p in set(facts.modules) - set(skipped) if p.rsplit(".", 1)[-1] not in MODULES or layer_index(p) is None)
    if unmapped:
        found.append(Finding("error", f"TensorRT-LLM loads LoRA only on layered {', '.join(MODULES)} modules; not on {listed(unmapped)}"))
    modules = " ".join(sorted({MODULES[t] for t in facts.types if t in MODULES}))
    found.append(Finding("info", f"build the engine with --lora_plugin auto --max_lora_rank {facts.rank} --lora_target_modules {modules}"))
    if facts.rank > DEFAULT_MAX_LORA_RANK:
        found.append(Finding("warning", f"rank {facts.rank} is above TensorRT-LLM's default max_lora_rank ({DEFAULT_MAX_LORA_RANK}): set it when building"))
    return found


PROFILE = Profile("trtllm", "TensorRT-LLM", check, package="tensorrt_llm")
