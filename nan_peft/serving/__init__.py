"""Would a serving engine serve this adapter as peft does? One profile per engine, each in its own file with
the engine source its rules were read from (DESIGN.md section 4); add an engine by adding a file and a line
to PROFILES.

`serving_findings(adapter)` is pure: it reads the adapter's config and factor shapes, nothing else, and returns
for each engine a list of Findings (see Finding). `plan_for(adapter, target)` fits a merged adapter to one engine.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Iterable

from ..errors import NanPeftError
from ..lora import LoraAdapter
from ..writer import adapter_config, servable_rank
from . import llamacpp, peft, sglang, stacking, trtllm, vllm
from .facts import Facts, Finding, ModuleFacts, Profile, Target, layer_index, loads, module_type

PROFILES: dict[str, Profile] = {
    profile.name: profile
    for profile in (vllm.PROFILE, sglang.PROFILE, stacking.LORAX, stacking.TGI, trtllm.PROFILE, llamacpp.PROFILE, peft.PROFILE)
}
ENGINES = tuple(PROFILES)

__all__ = ["ENGINES", "Finding", "PROFILES", "ServingPlan", "Target", "engine_rank", "layer_index", "loads", "module_type",
           "plan_for", "serving_findings", "target_for", "written_findings"]


def target_for(engine: str, tensor_parallel: int = 1, version: str | None = None) -> Target:
    """The deployment of `engine` to check for; with no version named, the installed engine's (read from its
    package metadata, without importing it), else None (the oldest rules)."""
    if engine not in PROFILES:
        raise NanPeftError(f"unknown serving engine {engine!r}; choose from {', '.join(ENGINES)}")
    package = PROFILES[engine].package
    if version is None and package is not None:
        try:
            version = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return Target(engine, tensor_parallel, version)


def serving_findings(
    adapter: LoraAdapter, tensor_parallel: int = 1, engine_version: str | None = None, where: str = "ADAPTER_DIR", files: Iterable[str] = ()
) -> dict[str, list[Finding]]:
    """For each engine in ENGINES, what stands between this adapter and the engine serving it as peft would.
    `engine_version` applies to every engine (only vLLM's rules depend on it today); `files` names the files
    beside the adapter (SGLang refuses an added_tokens.json)."""
    return _findings(Facts.of(adapter, where, files), tensor_parallel, engine_version)


def _findings(facts: Facts, tensor_parallel: int, engine_version: str | None) -> dict[str, list[Finding]]:
    return {name: profile.check(facts, target_for(name, tensor_parallel, engine_version)) for name, profile in PROFILES.items()}


def engine_rank(engine: str | Target, rank: int) -> int:
    """The rank to write for an engine: the smallest it serves as peft does at or above `rank` (vLLM's next
    --max-lora-rank value, a rank LoRAX / TGI do not pad, ...). Zero padding keeps the update exact."""
    target = engine if isinstance(engine, Target) else target_for(engine)
    return PROFILES[target.engine].rank(rank, target)


@dataclasses.dataclass(frozen=True)
class ServingPlan:
    """How to write an adapter for one engine: the adapter and rank to write, what was changed to fit the
    engine, and what the engine still says about the result (errors mean it cannot serve it)."""

    target: Target
    adapter: LoraAdapter
    rank: int
    changes: list[str]
    findings: list[Finding]

    @property
    def engine(self) -> str:
        return self.target.engine

    def raise_for_errors(self) -> None:
        """NanPeftError with the first reason the engine could not serve the adapter, if any."""
        errors = [f.message for f in self.findings if f.level == "error"]
        if errors:
            raise NanPeftError(f"{self.engine} cannot serve the merged adapter: {errors[0]}")


def plan_for(adapter: LoraAdapter, target: str | Target, rank: int | None = None, where: str = "ADAPTER_DIR") -> ServingPlan:
    """Fit `adapter` (in nan-peft's servable form: one rank, scales baked in) to the engine of `target`: pad the
    rank (engine_rank), leave out tensors the engine refuses (full weights carried beside the factors) and check
    the result with the engine's profile. `rank` is the rank asked for (default: the adapter's)."""
    target = target if isinstance(target, Target) else target_for(target)
    rank = servable_rank(adapter, rank)
    changes = []
    written = engine_rank(target, rank)
    if written != rank:
        changes.append(f"padded the rank from {rank} to {written} with zeros (exact) for {target.engine}")
    if target.engine != "peft" and (adapter.extras or adapter.saved):
        left = sorted(adapter.extras) + sorted(adapter.saved)
        changes.append(
            f"left out {len(left)} full tensor(s) that {target.engine} does not take ({', '.join(left[:2])}{' ...' if len(left) > 2 else ''}); "
            "they are copies of the base model's weights unless its vocabulary was resized"
        )
        adapter = dataclasses.replace(adapter, extras={}, saved={})
    findings = PROFILES[target.engine].check(written_facts(adapter, written, where), target)
    return ServingPlan(target, adapter, written, changes, findings)


def written_facts(adapter: LoraAdapter, rank: int | None = None, where: str = "ADAPTER_DIR") -> Facts:
    """The facts of `adapter` as nan-peft writes it: its config from writer.adapter_config, one rank (`rank`,
    default the adapter's), scales baked in."""
    rank = servable_rank(adapter, rank)
    modules = {path: ModuleFacts(m.kind, rank, 1.0) for path, m in adapter.modules.items()}
    return Facts(adapter_config(adapter, rank), modules, [*adapter.extras, *adapter.saved], where)


def written_findings(adapter: LoraAdapter, rank: int | None = None, tensor_parallel: int = 1) -> dict[str, list[Finding]]:
    """serving_findings of `adapter` as nan-peft writes it (written_facts)."""
    return _findings(written_facts(adapter, rank), tensor_parallel, None)
