"""LoRAX and TGI, which stack each module type's factors across layers. Read from LoRAX's
server/lorax_server/adapters/lora.py (LoraWeights.load) and utils/punica.py (pad_rank, pad_to_min_rank), and
TGI's server/text_generation_server/adapters/lora.py (LoraWeights.prepare_weights) with its punica_sgmv
kernel's constants (as in backends/gaudi/server/text_generation_server/utils/sgmv.py):
- one scale, lora_alpha / config.r (/ sqrt with use_rslora), for every module; rank_pattern / alpha_pattern,
  DoRA, biases and modules_to_save are not read.
- Each module type is loaded in turn, its rank padded by pad_rank (to 8 * world_size when at or below it,
  else up to the next multiple of 16) and the padded rank assigned back to the shared config
  (`config.r = padded_rank`): every module type loaded after the first is then scaled by
  lora_alpha / padded_r. Only a rank that pad_rank leaves unchanged is served as peft serves it.
- A module type missing from any layer is dropped whole (`return None`); differing ranks within a type
  cannot be stacked. Ranks outside MIN_RANK_CUSTOM..MAX_RANK_CUSTOM (16..128) run slower kernels, and so do
  ranks above BGMV_MAX_RANK at decode (LoRAX 128, TGI 64).
"""

from __future__ import annotations

from functools import partial

from .facts import COMMON_TARGETS, Facts, Finding, Profile, Target, global_scale, language_model_findings, layer_index, listed, scale_findings, unread_findings

MIN_SGMV_RANK = 8  # times the tensor-parallel degree
SGMV_BLOCK_SIZE = 16
FAST_RANKS = (16, 128)  # MIN_RANK_CUSTOM, MAX_RANK_CUSTOM


def padded_rank(rank: int, tensor_parallel: int) -> int:
    """What pad_rank makes of `rank` (pad_to_min_rank with min_rank = MIN_SGMV_RANK * world_size)."""
    min_rank = MIN_SGMV_RANK * tensor_parallel
    return min_rank if rank <= min_rank else -(-rank // SGMV_BLOCK_SIZE) * SGMV_BLOCK_SIZE


def rank(rank: int, target: Target) -> int:
    """The smallest rank >= `rank` and >= the fast kernels' 16 that pad_rank leaves unchanged (so that every
    module type keeps lora_alpha / r) and that the tensor-parallel shards split evenly."""
    tp = target.tensor_parallel
    candidate = max(rank, FAST_RANKS[0])
    while padded_rank(candidate, tp) != candidate or candidate % tp:
        candidate += 1
    return candidate


def check(facts: Facts, target: Target, engine: str, decode_max_rank: int) -> list[Finding]:
    found = unread_findings(facts, engine)
    rule = "lora_alpha/sqrt(r) (rsLoRA)" if facts.rslora else "lora_alpha/r"
    found += scale_findings(facts, engine, global_scale, f"{rule} everywhere and ignores rank_pattern / alpha_pattern")
    found += language_model_findings(facts, engine)
    r, tp = facts.config.get("r"), target.tensor_parallel
    if facts.global_scale is not None and isinstance(r, int) and padded_rank(r, tp) != r:
        padded = padded_rank(r, tp)
        scale = facts.global_scale * (r / padded if not facts.rslora else (r / padded) ** 0.5)
        found.append(
            Finding(
                "error",
                f"{engine} pads rank {r} to {padded} (tensor parallel {tp}) and then scales every module type after "
                f"the first by lora_alpha/{padded} = {scale:g} instead of {facts.global_scale:g}; write it with "
                f"--serve {engine.lower()}{f' --tensor-parallel {tp}' if tp > 1 else ''} (rank {rank(r, target)})",
            )
        )
    for name, ranks in sorted(facts.stacks.items()):
        if len(set(ranks.values())) > 1:
            found.append(Finding("error", f"{engine} stacks the {name} modules of all layers into one tensor; their ranks differ ({sorted(set(ranks.values()))})"))
    partial_types = _partial_stacks(facts)
    if facts.config.get("layers_to_transform") is not None or partial_types:
        found.append(
            Finding(
                "error",
                f"{engine} applies a module type only if every layer of the model has it and drops it otherwise"
                + (f" ({', '.join(partial_types)} cover fewer layers than the model has)" if partial_types else " (layers_to_transform is set)"),
            )
        )
    if facts.full:
        found.append(Finding("warning", f"{engine} ignores tensors that are not LoRA factors ({listed(facts.full)})"))
    unusual = sorted(set(facts.types) - COMMON_TARGETS - {"lm_head"})
    if unusual:
        found.append(Finding("warning", f"{engine} skips modules its model class does not map, which may include: {', '.join(unusual)}"))
    low, high = FAST_RANKS
    if not low <= facts.rank <= high:
        found.append(Finding("warning", f"rank {facts.rank} is outside {low}..{high}, the ranks of {engine}'s fast kernels"))
    elif facts.rank > decode_max_rank:
        found.append(Finding("warning", f"rank {facts.rank} is above {decode_max_rank}: {engine} decodes with its slower SGMV path"))
    return found


def _partial_stacks(facts: Facts) -> list[str]:
    """The layered module types ('model.layers.*.self_attn.q_proj') that some layer of the model lacks, seen from
    the module paths alone: layers are numbered from 0, so a model whose adapter reaches layer n has layers 0..n,
    and a type missing any of them is partial (layers_to_transform, or a merge of such adapters, which keeps
    no config). Layer stacks ('model.layers', 'encoder.layer') are counted apart. A type missing only layers
    above the adapter's highest one cannot be seen here."""
    stacks: dict[str, dict[str, set[int]]] = {}  # the path before the layer number -> {module type: layers}
    for name, paths in facts.stacks.items():
        if "*" in name:
            stacks.setdefault(name.partition(".*.")[0], {})[name] = {layer_index(p) for p in paths}
    partial_types = []
    for types in stacks.values():
        model_layers = set(range(max(max(layers) for layers in types.values()) + 1))
        partial_types += [name for name, layers in types.items() if layers != model_layers]
    return sorted(partial_types)


LORAX = Profile("lorax", "LoRAX", partial(check, engine="LoRAX", decode_max_rank=128), rank, package="lorax-server")
TGI = Profile("tgi", "TGI", partial(check, engine="TGI", decode_max_rank=64), rank, package="text-generation-server")
