"""vLLM, read from its releases' vllm/lora/peft_helper.py (PEFTHelper) and vllm/config/lora.py (LoRAConfig):
- the scale is lora_alpha / r (/ sqrt(r) with use_rslora) for every module before 0.32.0; from 0.32.0
  get_rank_and_scaling applies rank_pattern / alpha_pattern per module with peft's key rule;
- _validate_features refuses DoRA and modules_to_save, except ["classifier", "score"] from 0.31.0;
  validate_legal refuses bias != "none", and a rank (r, and from 0.32.0 every rank_pattern value) above
  --max-lora-rank, one of MaxLoRARanks;
- the model class must declare every target module (checked only by name here: the class is not known).
"""

from __future__ import annotations

from .facts import COMMON_TARGETS, Facts, Finding, ModuleFacts, Profile, Target, global_scale, language_model_findings, listed, module_type, names, scale_findings

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
HEADS_SINCE = "0.31.0"  # peft_helper.py: modules_to_save of classification heads accepted
PATTERNS_SINCE = "0.32.0"  # peft_helper.py: get_rank_and_scaling
HEADS = ("classifier", "score")


def peft_scale(facts: Facts, module: ModuleFacts) -> float:
    return module.scale


def check(facts: Facts, target: Target) -> list[Finding]:
    config = facts.config
    found = []
    if config.get("use_dora"):
        found.append(Finding("error", "vLLM refuses DoRA adapters (use_dora)"))
    saved = config.get("modules_to_save") or []
    saved = [saved] if isinstance(saved, str) else list(saved)
    heads_ok = target.at_least(HEADS_SINCE)
    refused = [m for m in saved if not (heads_ok and m in HEADS)]
    if refused:
        since = f"; vLLM {HEADS_SINCE} and later accept {' / '.join(HEADS)} heads" if not heads_ok and set(refused) <= set(HEADS) else ""
        found.append(Finding("error", f"vLLM refuses modules_to_save ({names(refused)}){since}"))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append(Finding("error", "vLLM refuses adapter biases (bias, lora_bias)"))
    full = [key for key in facts.full if not (heads_ok and any(f".{head}." in f".{key}" for head in HEADS))]
    if full and not refused:
        found.append(Finding("error", f"vLLM refuses tensors that are not LoRA factors ({listed(full)})"))
    if target.at_least(PATTERNS_SINCE):
        found += scale_findings(facts, "vLLM", peft_scale, "peft's rank_pattern / alpha_pattern per module")
    else:
        rule = "lora_alpha/sqrt(r) (rsLoRA)" if facts.rslora else "lora_alpha/r"
        found += scale_findings(facts, "vLLM", global_scale, f"{rule} everywhere and ignores rank_pattern / alpha_pattern before {PATTERNS_SINCE} (--engine-version)")
    found += language_model_findings(facts, "vLLM")
    largest = MAX_LORA_RANKS[-1]
    if facts.rank > largest:
        found.append(Finding("error", f"rank {facts.rank} exceeds vLLM's largest --max-lora-rank ({largest}); truncate with --combine svd --rank"))
    else:
        found.append(Finding("info", f"rank {facts.rank}: start vLLM with --max-lora-rank {rank(facts.rank, target)} or more"))
    embeddings = facts.of_kind("embedding")
    if embeddings:
        found.append(Finding("warning", f"embedding LoRA ({listed(embeddings)}) loads only where vLLM's model class supports it"))
    unusual = sorted(set(facts.types) - COMMON_TARGETS - {module_type(p) for p in embeddings})
    if unusual:
        found.append(
            Finding(
                "warning",
                "vLLM raises on target modules its model class does not declare, and these are not among the usual "
                f"attention / MLP projection names: {', '.join(unusual)}; check the base model's LoRA support",
            )
        )
    return found


def rank(rank: int, target: Target) -> int:
    """The next --max-lora-rank value: vLLM allocates that rank for every adapter anyway."""
    return next((r for r in MAX_LORA_RANKS if r >= rank), rank)


PROFILE = Profile("vllm", "vLLM", check, rank, package="vllm")
