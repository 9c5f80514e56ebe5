"""Provenance written next to a merged adapter: the merge record (JSON) and the model card (README.md).

Both are pure functions of a MergeResult and of what the caller knows about the run (inputs as given, the
command line), so that the same command on the same inputs writes the same bytes: no timestamps, no absolute
temporary paths. `input_entry` is the one function that reads files (to hash them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from .merge import MergeResult
from .reader import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

RECORD_NAME = "merge_record.json"
CARD_NAME = "README.md"
RECORD_FORMAT = 1


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_entry(path: str, folder: str | os.PathLike, name: str) -> dict:
    """How the record names one input: the path as the user gave it, and the sha256 of each file the reader uses
    (adapter_config.json and the weights file it read) in `folder`, where the adapter actually lies."""
    folder = Path(folder)
    weights = SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else BIN_NAME
    files = {file: sha256_file(folder / file) for file in (CONFIG_NAME, weights) if (folder / file).is_file()}
    return {"name": name, "path": str(path), "sha256": files}


def merge_record(
    result: MergeResult,
    inputs: Sequence[Mapping],
    command: Sequence[str],
    options: Mapping | None = None,
    recipe: Mapping | None = None,
) -> dict:
    """The merge record: package version, command (argv list), inputs with sha256, options, norms, coefficients,
    and per module the merged norm and the truncation error.

    `inputs` holds one input_entry per source, in order; `options` adds to result.options what the library does not
    know (the device the merge ran on); `recipe` is the YAML recipe's content when one was used.
    """
    from . import __version__

    names = list(result.gram.adapter_names)
    coefficients = result.coefficients
    per_adapter = coefficients.per_adapter
    record = {
        "format": RECORD_FORMAT,
        "nan_peft_version": __version__,
        "command": list(command),
        "inputs": [dict(entry) for entry in inputs],
        "options": {**result.options, **dict(options or {})},
        "norms": result.norms,
        "coefficients": {
            "method": coefficients.method,
            "granularity": coefficients.granularity,
            "per_adapter": None if per_adapter is None else dict(zip(names, per_adapter.tolist())),
            "per_module": None
            if per_adapter is not None
            else {module: dict(zip(names, row)) for module, row in zip(coefficients.modules, coefficients.values.tolist())},
        },
        "rank": result.rank,
        "modules": [module_entry(report) for report in result.report],
    }
    if recipe is not None:
        record["recipe"] = dict(recipe)
    return record


def module_entry(report) -> dict:
    """One ModuleReport as plain data (the keys of the record's and of `nan-peft merge --json`'s "modules")."""
    return {
        "module": report.module,
        "input_rank": report.input_rank,
        "rank": report.rank,
        "norm": report.norm,
        "discarded": report.discarded,
        "relative_discarded": report.relative_discarded,
    }


def record_json(record: Mapping) -> str:
    return json.dumps(record, indent=2) + "\n"


def provenance_files(result: MergeResult, record: Mapping, output: str) -> dict[str, str]:
    """The files written next to the adapter: {RECORD_NAME: the record as JSON, CARD_NAME: the model card}."""
    return {RECORD_NAME: record_json(record), CARD_NAME: model_card(result, record, output)}


def model_card(result: MergeResult, record: Mapping, output: str) -> str:
    """README.md for the merged adapter: what went in, with which coefficients, and how to load it with peft."""
    base = result.adapter.base_model
    options = record["options"]
    coefficients = record["coefficients"]
    combine = options.get("combine", "cat")
    how = (
        "exactly (the factors are concatenated, rank = sum of the ranks)"
        if combine == "cat"
        else f"into rank {result.rank} by an SVD of the merged update (the best rank-{result.rank} approximation)"
    )
    front = ["---", "library_name: peft", "tags:", "- lora", "- nan-peft", "- merge"]
    if base:
        front.insert(1, f"base_model: {json.dumps(base)}")
    front.append("---")

    rows = ["| adapter | path | norm ‖ΔW‖_F | coefficient |", "|---|---|---:|---:|"]
    per_adapter = coefficients["per_adapter"]
    for entry in record["inputs"]:
        name = entry["name"]
        c = f"{per_adapter[name]:.6g}" if per_adapter is not None else "per module"
        rows.append(f"| {name} | `{entry['path']}` | {record['norms'][name]:.6g} | {c} |")

    method = coefficients["method"]
    rule = {
        "nan": "NAN (arXiv 2505.16148): each coefficient is proportional to the inverse Frobenius norm of the adapter's update",
        "uniform": "uniform coefficients",
        "manual": "weights given by hand",
    }.get(method, method)
    rule_name = options.get("method", "task_arithmetic")
    rule_options = ", ".join(f"{key} {options[key]}" for key in ("density", "scale", "normalize", "seed") if options.get(key) is not None)
    plugged = f"plugged into the `{rule_name}` merge rule" + (f" ({rule_options})" if rule_options else "")
    lines = [
        *front,
        "",
        "# Merged LoRA adapter",
        "",
        f"Made by nan-peft {record['nan_peft_version']} from {len(record['inputs'])} LoRA adapters with {rule}, "
        f"granularity `{coefficients['granularity']}`, {plugged}, merged {how}.",
        "",
        *rows,
        "",
    ]
    if combine == "svd" and result.report:
        worst = max(result.report, key=lambda r: r.relative_discarded)
        lines += [f"Largest relative truncation error: {worst.relative_discarded:.3g} (module `{worst.module}`).", ""]
    loader = "AutoModelForCausalLM" if result.adapter.config.get("task_type") in (None, "CAUSAL_LM") else "AutoModel"
    lines += [
        "## Load it",
        "",
        "```python",
        f"from transformers import {loader}",
        "from peft import PeftModel",
        "",
        f"base = {loader}.from_pretrained({json.dumps(base or 'BASE_MODEL')})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(output)})",
        "```",
        "",
        f"The adapter has one rank ({record['rank']}) and its scales baked into the factors (lora_alpha = r), "
        + _serving_sentence(result, record["rank"]),
        "",
        "## Reproduce it",
        "",
        f"{RECORD_NAME} holds the inputs' sha256, every option, the norms and coefficients and the per-module "
        "truncation error. Run again from the same folder, this command writes the same bytes:",
        "",
        "```",
        shlex.join(record["command"]),
        "```",
        "",
    ]
    return "\n".join(lines)


def _serving_sentence(result: MergeResult, rank: int) -> str:
    """Which engines that hot-swap adapters load the merged adapter (written at `rank`) as is."""
    from .serving import loads, written_findings

    names = {"vllm": "vLLM", "lorax": "LoRAX", "tgi": "TGI"}
    findings = written_findings(result.adapter, rank)
    refused = [label for engine, label in names.items() if not loads(findings[engine])]
    if not refused:
        return "so serving engines that hot-swap adapters (vLLM, LoRAX, TGI) load it as is; `nan-peft inspect` checks this."
    loaded = [label for label in names.values() if label not in refused]
    return (f"but {', '.join(refused)} would not serve it as peft does (`nan-peft inspect` says why)"
            + (f"; {', '.join(loaded)} load{'s' if len(loaded) == 1 else ''} it as is." if loaded else "."))
