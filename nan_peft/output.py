"""Writing a merge, in one call from one plan: the adapter for the heads asked for, fitted to a serving engine,
the record and card describing exactly what is written, published atomically (a peft folder, or a GGUF file
for llama.cpp: write_merge); or the full model when folding (fold_merge). The command line only parses and
renders around these."""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

from .errors import NanPeftError
from .fold import parse_max_memory, resolve_base
from .gguf_lora import gguf_architecture, read_base_config, write_gguf_lora
from .hub import provenance
from .merge import MergeResult
from .record import provenance_files
from .serving import ServingPlan, plan_for, target_for
from .spec import FoldSpec, OutputSpec


class OptionConflict(NanPeftError):
    """Options that do not go together (a usage error on the command line)."""


@dataclasses.dataclass
class Written:
    """What write_merge wrote: the folder, the serving plan (None without an engine) and the notes to show."""

    folder: Path
    plan: ServingPlan | None
    notes: list[str]


def write_merge(result: MergeResult, output: str | os.PathLike, spec: OutputSpec, record: dict, *, overwrite: bool = False,
                base_config: Mapping | None = None) -> Written:
    """Write `result` as `spec` says, with the merge record (`record`, whose rank and deployment options this sets
    to what is written) and the model card beside it. base_config: the base model's config.json for format "gguf"."""
    heads = spec.heads  # "per-task" as the CLI spells it; MergeResult takes either spelling
    adapter = result.adapter_for(heads)
    plan, notes = None, []
    if spec.serve is not None:
        target = target_for(spec.serve, spec.tensor_parallel or 1, spec.engine_version)
        record["options"].update(tensor_parallel=target.tensor_parallel, engine_version=target.version)
        if spec.format == "gguf":
            record["options"].update(format="gguf", base=spec.base)
        plan = plan_for(adapter, target, where=str(output))
        plan.raise_for_errors()
        record["rank"] = plan.rank  # the rank written: padded for the engine
        notes += [f"{spec.serve}: {message}" for message in plan.changes + [f"{f.level}: {f.message}" for f in plan.findings if f.level != "info"]]
    notes += [f"note: {notice}" for notice in result.notices(heads)]
    files = provenance_files(result, record, str(output))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes say it
        if spec.format == "gguf":
            protected = [source.source for source in result.sources if source.source]
            write_gguf_lora(plan.adapter, base_config, output, rank=plan.rank, overwrite=overwrite, extra_files=files, protected=protected)
            folder = Path(output)
        else:
            folder = result.save_pretrained(output, overwrite=overwrite, extra_files=files, heads=heads, serve=plan)
    return Written(folder, plan, notes)


def fold_merge(result: MergeResult, output: str | os.PathLike, spec: FoldSpec, record: dict, *, overwrite: bool = False) -> Path:
    """Fold `result` into the base model `spec` names (resolved once: the folder folded is the commit recorded),
    with the record and a model card for the full model beside it."""
    record["options"]["fold_into"] = spec.fold_into
    base = resolve_base(spec.fold_into)
    base_source = provenance(spec.fold_into, base)
    if base_source is not None:
        record["fold_into_hub"] = base_source
    memory = parse_max_memory(spec.max_memory) if spec.max_memory else None
    return result.fold_into(base, output, device=result.spec.device, device_map=spec.device_map, max_memory=memory,
                            overwrite=overwrite, extra_files=provenance_files(result, record, str(output)))


def check_combination(output: OutputSpec, fold: FoldSpec) -> OutputSpec:
    """The output spec with what one option implies of another (--format gguf serves llama.cpp), or
    OptionConflict for options that do not go together."""
    if output.format == "gguf":
        if output.serve not in (None, "llamacpp") or output.heads == "per-task":
            raise OptionConflict("--format gguf writes one llama.cpp adapter: --serve llamacpp (implied) and no --heads per-task")
        output = dataclasses.replace(output, serve="llamacpp")
    elif output.base is not None:
        raise OptionConflict("--base goes with --format gguf (--fold-into takes the base model to fold into)")
    if fold.fold_into is None and (fold.device_map or fold.max_memory):
        raise OptionConflict("--device-map and --max-memory go with --fold-into")
    if fold.fold_into is not None and (output.serve or output.heads != "drop"):
        raise OptionConflict("--fold-into writes a full model: --serve and --heads do not apply")
    if output.serve is None and (output.tensor_parallel is not None or output.engine_version is not None):
        raise OptionConflict("--tensor-parallel and --engine-version go with --serve")
    return output


def gguf_base_config(base: str | None) -> dict:
    """The base model's config.json for --format gguf: --base, else the adapters' recorded base model when it is
    a local folder (nothing is downloaded)."""
    if not base or not Path(base, "config.json").is_file():
        raise NanPeftError(f"--format gguf needs the base model's config.json: pass --base BASE (its folder){f'; {base} is not one' if base else ''}")
    config = read_base_config(base)
    gguf_architecture(config)
    return config
