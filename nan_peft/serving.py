"""Would a serving engine load this adapter as is? Checks for vLLM, LoRAX, TGI and peft (DESIGN.md section 4).

`serving_findings(adapter)` is pure: it reads the adapter's config and factor shapes, nothing else, and returns
for each engine a list of Findings. An "error" means the engine refuses the adapter or would serve a different
update than peft computes (silently wrong); a "warning" means it loads, but something needs a flag, runs a slower
path or depends on the engine's model class; an "info" states what to pass. What each rule encodes, read from
the engines' sources:

- vLLM (lora/peft_helper.py, lora/models.py): one scale lora_alpha / r (or / sqrt(r) with use_rslora) for every
  module; rank_pattern / alpha_pattern are ignored. Refuses DoRA, modules_to_save, bias (unless bias is enabled)
  and any tensor that is not a LoRA factor; the config's r must not exceed --max-lora-rank, one of
  VLLM_MAX_LORA_RANKS. Target modules must be ones its model class declares.
- LoRAX and TGI (adapters/lora.py): one global scale as vLLM; the factors of one module type are stacked across
  layers, so differing ranks within a type fail, and a type missing from any layer is dropped whole. Other config
  fields (DoRA, bias, modules_to_save) are not read: such adapters would be served wrong. Ranks outside
  FAST_RANKS run slower kernels (TGI's decode kernel stops at rank 64).
- peft: loads every variant; it warns about config keys the installed version does not know, and
  AutoPeftModel needs base_model_name_or_path.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

from .errors import NanPeftError
from .lora import LoraAdapter

ENGINES = ("vllm", "lorax", "tgi", "peft")
LEVELS = ("error", "warning", "info")

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
FAST_RANKS = (16, 128)  # LoRAX / TGI custom SGMV kernels
TGI_BGMV_MAX_RANK = 64

# Module names the engines' decoder implementations commonly declare for LoRA (Llama, Mistral, Qwen, Gemma, ...).
COMMON_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"})

_LAYER = re.compile(r"\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Finding:
    level: str  # one of LEVELS
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "message": self.message}


def loads(findings: Iterable[Finding]) -> bool:
    """True when none of the findings is an error."""
    return not any(f.level == "error" for f in findings)


def serving_findings(adapter: LoraAdapter) -> dict[str, list[Finding]]:
    """For each engine in ENGINES, what stands between this adapter and the engine serving it as peft would."""
    facts = _Facts(adapter)
    return {
        "vllm": _vllm(facts),
        "lorax": _stacking_engine(facts, "LoRAX", bgmv_max_rank=None),
        "tgi": _stacking_engine(facts, "TGI", bgmv_max_rank=TGI_BGMV_MAX_RANK),
        "peft": _peft(facts),
    }


def module_type(path: str) -> str:
    """The last component of a module path: 'model.layers.3.self_attn.q_proj' -> 'q_proj'."""
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    """The layer number in a module path (the first '.N.' component), or None."""
    match = _LAYER.search(f".{path}.")
    return int(match.group(1)) if match else None


class _Facts:
    """What the rules look at, derived once from the adapter."""

    def __init__(self, adapter: LoraAdapter):
        config = adapter.config
        self.config = config
        self.modules = adapter.modules
        self.extras = sorted(adapter.extras)
        self.rank = max(adapter.ranks | ({config["r"]} if isinstance(config.get("r"), int) else set()))
        self.types: dict[str, dict[str, int]] = {}  # module type -> {path: rank}
        self.stacks: dict[str, dict[str, int]] = {}  # path with its layer number as '*' -> {path: rank}
        for path, module in adapter.modules.items():
            self.types.setdefault(module_type(path), {})[path] = module.rank
            self.stacks.setdefault(_LAYER.sub(".*.", path, count=1), {})[path] = module.rank
        self.kinds = {path: m.kind for path, m in adapter.modules.items()}
        self.global_scale = _global_scale(config)
        self.scale_mismatch = (
            []
            if self.global_scale is None
            else sorted(p for p, m in adapter.modules.items() if not math.isclose(m.scale, self.global_scale, rel_tol=1e-9))
        )

    def listed(self, paths: list[str], limit: int = 3) -> str:
        shown = ", ".join(paths[:limit])
        return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _global_scale(config: dict) -> float | None:
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)) or r <= 0:
        return None
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def _common(facts: _Facts, engine: str) -> list[Finding]:
    """Rules shared by the engines that serve with one global scale."""
    found = []
    if facts.global_scale is None:
        found.append(Finding("error", f"adapter_config.json has no usable r / lora_alpha; {engine} reads its scale from them"))
    elif facts.scale_mismatch:
        found.append(
            Finding(
                "error",
                f"{engine} scales every module by lora_alpha/r{' (rsLoRA: /sqrt(r))' if facts.config.get('use_rslora') else ''}"
                f" = {facts.global_scale:g} and ignores rank_pattern / alpha_pattern: {len(facts.scale_mismatch)} module(s) "
                f"({facts.listed(facts.scale_mismatch)}) would get the wrong scale; merge or rewrite it with nan-peft to bake "
                "the scales in",
            )
        )
    convs = sorted(p for p, kind in facts.kinds.items() if kind == "conv")
    if convs:
        found.append(Finding("error", f"{engine} serves language models and has no convolution LoRA ({facts.listed(convs)})"))
    return found


def _vllm(facts: _Facts) -> list[Finding]:
    config = facts.config
    found = []
    if config.get("use_dora"):
        found.append(Finding("error", "vLLM refuses DoRA adapters (use_dora)"))
    if config.get("modules_to_save"):
        found.append(Finding("error", f"vLLM refuses modules_to_save ({_names(config['modules_to_save'])})"))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append(Finding("error", "vLLM refuses adapter biases unless the server enables LoRA bias"))
    if facts.extras:
        found.append(Finding("error", f"vLLM refuses tensors that are not LoRA factors ({facts.listed(facts.extras)})"))
    found += _common(facts, "vLLM")
    largest = VLLM_MAX_LORA_RANKS[-1]
    if facts.rank > largest:
        found.append(Finding("error", f"rank {facts.rank} exceeds vLLM's largest --max-lora-rank ({largest}); truncate with --combine svd --rank"))
    else:
        needed = next(r for r in VLLM_MAX_LORA_RANKS if r >= facts.rank)
        found.append(Finding("info", f"rank {facts.rank}: start vLLM with --max-lora-rank {needed} or more"))
    embeddings = sorted(p for p, kind in facts.kinds.items() if kind == "embedding")
    if embeddings:
        found.append(Finding("warning", f"embedding LoRA ({facts.listed(embeddings)}) loads only where vLLM's model class supports it"))
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


def _stacking_engine(facts: _Facts, engine: str, bgmv_max_rank: int | None) -> list[Finding]:
    config = facts.config
    found = []
    ignored = [
        (config.get("use_dora"), "use_dora (the DoRA magnitude is dropped)"),
        (config.get("modules_to_save"), f"modules_to_save ({_names(config.get('modules_to_save'))})"),
        (config.get("bias", "none") != "none" or config.get("lora_bias"), "adapter biases"),
    ]
    for present, what in ignored:
        if present:
            found.append(Finding("error", f"{engine} does not read {what}: it would serve a different update than peft"))
    found += _common(facts, engine)
    for name, ranks in sorted(facts.stacks.items()):
        if len(set(ranks.values())) > 1:
            found.append(Finding("error", f"{engine} stacks the {name} modules of all layers into one tensor; their ranks differ ({sorted(set(ranks.values()))})"))
    partial = _partial_stacks(facts)
    if config.get("layers_to_transform") is not None or partial:
        found.append(
            Finding(
                "error",
                f"{engine} applies a module type only if every layer of the model has it and drops it otherwise"
                + (f" ({', '.join(partial)} cover fewer layers than the model has)" if partial else " (layers_to_transform is set)"),
            )
        )
    if facts.extras:
        found.append(Finding("warning", f"{engine} ignores tensors that are not LoRA factors ({facts.listed(facts.extras)})"))
    unusual = sorted(set(facts.types) - COMMON_TARGETS - {"lm_head"})
    if unusual:
        found.append(Finding("warning", f"{engine} skips modules its model class does not map, which may include: {', '.join(unusual)}"))
    low, high = FAST_RANKS
    if not low <= facts.rank <= high:
        found.append(
            Finding("warning", f"rank {facts.rank} is outside {low}..{high}, the ranks of {engine}'s fast kernels (pad with --rank {low} when smaller)")
        )
    elif bgmv_max_rank is not None and facts.rank > bgmv_max_rank:
        found.append(Finding("warning", f"rank {facts.rank} is above {bgmv_max_rank}: {engine} decodes with its slower SGMV path"))
    return found


def _partial_stacks(facts: _Facts) -> list[str]:
    """The layered module types ('model.layers.*.self_attn.q_proj') that some layer of the model lacks, seen from
    the module paths alone: layers are numbered from 0, so a model whose adapter reaches layer n has layers 0..n,
    and a type missing any of them is partial (layers_to_transform, or a merge of such adapters, which keeps
    no config). Layer stacks ('model.layers', 'encoder.layer') are counted apart. A type missing only layers
    above the adapter's highest one cannot be seen here."""
    stacks: dict[str, dict[str, set[int]]] = {}  # the path before the layer number -> {module type: layers}
    for name, paths in facts.stacks.items():
        if "*" in name:
            stacks.setdefault(name.partition(".*.")[0], {})[name] = {layer_index(p) for p in paths}
    partial = []
    for types in stacks.values():
        model_layers = set(range(max(max(layers) for layers in types.values()) + 1))
        partial += [name for name, layers in types.items() if layers != model_layers]
    return sorted(partial)


def _peft(facts: _Facts) -> list[Finding]:
    from peft import LoraConfig, __version__ as peft_version

    found = []
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(facts.config) - known)
    if unknown:
        found.append(Finding("warning", f"peft {peft_version} does not know the config key(s) {', '.join(unknown)} and ignores them"))
    saved = facts.config.get("peft_version")
    if isinstance(saved, str) and _version(saved) > _version(peft_version):
        found.append(Finding("warning", f"saved with peft {saved}, newer than the installed {peft_version}"))
    if not facts.config.get("base_model_name_or_path"):
        found.append(Finding("warning", "no base_model_name_or_path: pass the base model to PeftModel.from_pretrained yourself"))
    return found


def _names(value) -> str:
    return ", ".join(value) if isinstance(value, (list, tuple, set)) else str(value)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """How to write an adapter for one engine: the adapter and rank to write, what was changed to fit the
    engine, and what the engine still says about the result (errors mean it cannot serve it)."""

    engine: str
    adapter: LoraAdapter
    rank: int
    changes: list[str]
    findings: list[Finding]

    def raise_for_errors(self) -> None:
        """NanPeftError with the first reason the engine could not serve the adapter, if any."""
        errors = [f.message for f in self.findings if f.level == "error"]
        if errors:
            raise NanPeftError(f"{self.engine} cannot serve the merged adapter: {errors[0]}")


def engine_rank(engine: str, rank: int) -> int:
    """The rank to write for `engine`: vLLM's next --max-lora-rank value, at least the smallest rank of
    LoRAX's / TGI's fast kernels, else `rank` itself. Zero padding keeps the update exact."""
    if engine == "vllm":
        return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), rank)
    if engine in ("lorax", "tgi"):
        return max(rank, FAST_RANKS[0])
    return rank


def plan_for(adapter: LoraAdapter, engine: str, rank: int | None = None) -> ServingPlan:
    """Fit `adapter` (in nan-peft's servable form: one rank, scales baked in) to `engine`: pad the rank
    (engine_rank), leave out tensors the engine refuses (full weights carried beside the factors) and check
    the result with serving_findings. `rank` is the rank asked for (default: the adapter's)."""
    from .writer import servable_rank

    if engine not in ENGINES:
        raise NanPeftError(f"unknown serving engine {engine!r}; choose from {', '.join(ENGINES)}")
    rank = servable_rank(adapter, rank)
    changes = []
    target = engine_rank(engine, rank)
    if target != rank:
        changes.append(f"padded the rank from {rank} to {target} with zeros (exact) for {engine}")
    if engine != "peft" and (adapter.extras or adapter.saved):
        left = sorted(adapter.extras) + sorted(adapter.saved)
        changes.append(
            f"left out {len(left)} full tensor(s) that {engine} does not take ({', '.join(left[:2])}{' ...' if len(left) > 2 else ''}); "
            "they are copies of the base model's weights unless its vocabulary was resized"
        )
        adapter = dataclasses.replace(adapter, extras={}, saved={})
    return ServingPlan(engine, adapter, target, changes, written_findings(adapter, target)[engine])


def written_findings(adapter: LoraAdapter, rank: int | None = None) -> dict[str, list[Finding]]:
    """serving_findings of `adapter` as nan-peft writes it: its config from writer.adapter_config, one rank
    (`rank`, default the adapter's), scales baked in."""
    from .writer import adapter_config, servable_rank

    rank = servable_rank(adapter, rank)
    written = dataclasses.replace(
        adapter,
        config=adapter_config(adapter, rank),
        modules={p: dataclasses.replace(m, A=m.A.new_empty((rank, m.A.shape[1])), scale=1.0) for p, m in adapter.modules.items()},
    )
    return serving_findings(written)
