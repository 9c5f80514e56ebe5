"""What every engine profile looks at: the facts derived once from an adapter, the deployment it is checked
for (Target), the findings a profile returns, and the rules several engines share."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

from ..errors import NanPeftError
from ..lora import LoraAdapter, lora_scale

_LAYER = re.compile(r"\.(\d+)\.")

# Module names the engines' decoder implementations commonly declare for LoRA (Llama, Mistral, Qwen, Gemma, ...).
COMMON_TARGETS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"})


@dataclasses.dataclass(frozen=True)
class Finding:
    """An "error" means the engine refuses the adapter or would serve a different update than peft computes
    (silently wrong); a "warning" means it loads, but something needs a flag, runs a slower path or depends on
    the engine's model class; an "info" says what to pass."""

    level: str  # "error", "warning" or "info"
    message: str

    def as_dict(self) -> dict:
        return {"level": self.level, "message": self.message}


@dataclasses.dataclass(frozen=True)
class Target:
    """The deployment an adapter is checked or written for: the engine, its tensor-parallel degree (LoRAX and
    TGI pad ranks by it) and its version (vLLM's rules changed in 0.31 and 0.32; None: the oldest rules)."""

    engine: str
    tensor_parallel: int = 1
    version: str | None = None

    def __post_init__(self):
        if not isinstance(self.tensor_parallel, int) or isinstance(self.tensor_parallel, bool) or self.tensor_parallel < 1:
            raise NanPeftError(f"--tensor-parallel must be a whole number of at least 1, not {self.tensor_parallel!r}")
        if self.version is not None and not re.fullmatch(r"\d+(\.\d+)*([.+-]?\w+)*", self.version):
            raise NanPeftError(f"--engine-version must look like 0.32.0, not {self.version!r}")

    def at_least(self, version: str) -> bool:
        """Whether the engine's version is known and at least `version`."""
        return self.version is not None and version_tuple(self.version) >= version_tuple(version)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def loads(findings: Iterable[Finding]) -> bool:
    """True when none of the findings is an error."""
    return not any(f.level == "error" for f in findings)


def module_type(path: str) -> str:
    """The last component of a module path: 'model.layers.3.self_attn.q_proj' -> 'q_proj'."""
    return path.rsplit(".", 1)[-1]


def layer_index(path: str) -> int | None:
    """The layer number in a module path (the first '.N.' component), or None."""
    match = _LAYER.search(f".{path}.")
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class ModuleFacts:
    """What the rules need of one adapted module: its kind, the rank of its factors and peft's scale for it."""

    kind: str
    rank: int
    scale: float


class Facts:
    """What the rules look at, derived once: the config, each module's kind, rank and scale, and the full
    tensors carried beside the factors. `where` names the adapter's folder in the commands the findings print."""

    def __init__(
        self, config: dict, modules: dict[str, ModuleFacts], full: Iterable[str] = (), where: str = "ADAPTER_DIR", files: Iterable[str] = ()
    ):
        self.config = config
        self.where = where
        self.files = frozenset(files)  # the names of the files beside the adapter, where known
        self.modules = modules
        self.full = sorted(full)
        ranks = {m.rank for m in modules.values()} | ({config["r"]} if isinstance(config.get("r"), int) else set())
        self.rank = max(ranks, default=0)
        self.types: dict[str, dict[str, int]] = {}  # module type -> {path: rank}
        self.stacks: dict[str, dict[str, int]] = {}  # path with its layer number as '*' -> {path: rank}
        for path, module in modules.items():
            self.types.setdefault(module_type(path), {})[path] = module.rank
            self.stacks.setdefault(_LAYER.sub(".*.", path, count=1), {})[path] = module.rank
        self.rslora = bool(config.get("use_rslora"))
        r, alpha = config.get("r"), config.get("lora_alpha")
        usable = isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0
        self.global_scale = lora_scale(alpha, r, self.rslora) if usable else None

    @classmethod
    def of(cls, adapter: LoraAdapter, where: str = "ADAPTER_DIR", files: Iterable[str] = ()) -> Facts:
        modules = {path: ModuleFacts(m.kind, m.rank, m.scale) for path, m in adapter.modules.items()}
        return cls(adapter.config, modules, [*adapter.extras, *adapter.saved], where, files)

    def of_kind(self, kind: str) -> list[str]:
        return sorted(p for p, m in self.modules.items() if m.kind == kind)

    def named(self, *types: str) -> list[str]:
        return sorted(p for t in types for p in self.types.get(t, {}))


def listed(paths: list[str], limit: int = 3) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def names(value) -> str:
    return ", ".join(value) if isinstance(value, (list, tuple, set)) else str(value)


EngineScale = Callable[[Facts, ModuleFacts], float]


def global_scale(facts: Facts, module: ModuleFacts) -> float:
    """lora_alpha / r (or / sqrt(r) with rsLoRA) from the config, for every module: rank_pattern and
    alpha_pattern ignored (vLLM before 0.32, LoRAX, TGI)."""
    return facts.global_scale


def scale_findings(facts: Facts, engine: str, scale: EngineScale, rule: str) -> list[Finding]:
    """An error when the scale the engine applies (`scale`, described by `rule`) differs from peft's at any module."""
    if facts.global_scale is None:
        return [Finding("error", f"adapter_config.json has no usable r / lora_alpha; {engine} reads its scale from them")]
    wrong = sorted(p for p, m in facts.modules.items() if abs(scale(facts, m) - m.scale) > 1e-9 * abs(m.scale))
    if not wrong:
        return []
    example = facts.modules[wrong[0]]
    return [
        Finding(
            "error",
            f"{engine} scales by {rule}: {len(wrong)} module(s) ({listed(wrong)}) would get the wrong scale "
            f"({scale(facts, example):g} instead of peft's {example.scale:g} at {wrong[0]}); merge or rewrite it with "
            "nan-peft to bake the scales in",
        )
    ]


def language_model_findings(facts: Facts, engine: str) -> list[Finding]:
    """Engines that serve language models only have no convolution LoRA."""
    convs = facts.of_kind("conv")
    return [Finding("error", f"{engine} serves language models and has no convolution LoRA ({listed(convs)})")] if convs else []


def unread_findings(facts: Facts, engine: str) -> list[Finding]:
    """Errors for the config fields an engine does not read, so that it would serve a different update."""
    config = facts.config
    ignored = [
        (config.get("use_dora"), "use_dora (the DoRA magnitude is dropped)"),
        (config.get("modules_to_save"), f"modules_to_save ({names(config.get('modules_to_save'))})"),
        (config.get("bias", "none") != "none" or config.get("lora_bias"), "adapter biases"),
    ]
    return [Finding("error", f"{engine} does not read {what}: it would serve a different update than peft") for present, what in ignored if present]


def same_rank(rank: int, target: Target) -> int:
    return rank


@dataclasses.dataclass(frozen=True)
class Profile:
    """One serving engine: its name (`--serve NAME`, a key of `inspect --json`'s "serving"), how messages call
    it, the distribution whose installed version applies when none is named, what it finds in an adapter, and
    the rank nan-peft writes for it (zero padding, which keeps the update exact)."""

    name: str
    label: str
    check: Callable[[Facts, Target], list[Finding]]
    rank: Callable[[int, Target], int] = same_rank
    package: str | None = None
