"""llama.cpp (and Ollama, which loads its GGUF adapters), read from convert_lora_to_gguf.py and
src/llama-graph.cpp (build_lora_mm):
- the converter needs the base model's config: --base, or base_model_name_or_path fetched from the Hub;
- it writes one adapter.lora.alpha (lora_alpha) for all modules, and llama.cpp scales each module by
  alpha / rank of that module's factors: alpha_pattern and rsLoRA are not applied;
- it exits on any tensor that is not a LoRA factor or a norm (full embedding / lm_head weights, DoRA
  magnitudes, biases), and raises on lm_head LoRA when the base model ties lm_head to the embeddings.
"""

from __future__ import annotations

from .facts import Facts, Finding, ModuleFacts, Profile, Target, language_model_findings, listed, scale_findings, unread_findings


def per_rank_scale(facts: Facts, module: ModuleFacts) -> float:
    return facts.config["lora_alpha"] / module.rank


def check(facts: Facts, target: Target) -> list[Finding]:
    found = unread_findings(facts, "llama.cpp")
    found += scale_findings(facts, "llama.cpp", per_rank_scale, "lora_alpha / the rank of each module (rsLoRA and alpha_pattern are not applied)")
    found += language_model_findings(facts, "llama.cpp")
    if facts.full:
        found.append(Finding("error", f"convert_lora_to_gguf.py exits on tensors that are not LoRA factors ({listed(facts.full)})"))
    heads = facts.named("lm_head")
    if heads:
        found.append(Finding("warning", f"convert_lora_to_gguf.py refuses LoRA on lm_head ({listed(heads)}) when the base model ties it to the embeddings"))
    base = facts.config.get("base_model_name_or_path")
    if not base:
        found.append(Finding("warning", "no base_model_name_or_path: pass the base model's folder to convert_lora_to_gguf.py with --base"))
    found.append(
        Finding(
            "info",
            f"convert it as is: python convert_lora_to_gguf.py --base {'BASE_DIR'} --outfile merged.gguf {facts.where}; "
            "Ollama Modelfile: FROM <the base model> then ADAPTER ./merged.gguf",
        )
    )
    return found


PROFILE = Profile("llamacpp", "llama.cpp", check)
