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

from . import __version__, hub
from .merge import MergeResult
from .peft_format import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME
from .serving import PROFILES, loads, written_findings

RECORD_NAME = "merge_record.json"
CARD_NAME = "README.md"
RECORD_FORMAT = 1


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_entry(path: str, folder: str | os.PathLike, name: str, digests: Mapping[str, str] | None = None) -> dict:
    """How the record names one input: the path as the user gave it, and the sha256 of each file the reader uses
    (adapter_config.json and the weights file it read) in `folder`, where the adapter actually lies: `digests`,
    as the reader hashed them while reading (LoraAdapter.digests), else hashed here.

    An input read from the Hub (`folder` is the cached snapshot of the reference `path`) also gets
    "hub": {"repo_id", "revision" (as given, None for the default branch), "commit" (the one read), "subfolder"};
    a local input's entry has no such key."""
    folder = Path(folder)
    if digests:
        files = dict(digests)
    else:
        weights = SAFETENSORS_NAME if (folder / SAFETENSORS_NAME).is_file() else BIN_NAME
        files = {file: sha256_file(folder / file) for file in (CONFIG_NAME, weights) if (folder / file).is_file()}
    entry = {"name": name, "path": str(path)}
    source = hub.provenance(path, folder)
    if source is not None:
        entry["hub"] = source
    entry["sha256"] = files
    return entry


def input_entries(paths: Sequence[str], sources) -> list[dict]:
    """input_entry of each source adapter, with the digests its reading made."""
    return [input_entry(str(path), source.source, source.name, source.digests) for path, source in zip(paths, sources)]


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
        "truncation": report.truncation,
    }


def record_json(record: Mapping) -> str:
    return json.dumps(record, indent=2) + "\n"


def provenance_files(result: MergeResult, record: Mapping, output: str) -> dict[str, str]:
    """The files written next to the output: {RECORD_NAME: the record as JSON, CARD_NAME: the model card}
    (the card of a full model when record["options"] has "fold_into")."""
    card = folded_model_card if record["options"].get("fold_into") is not None else model_card
    return {RECORD_NAME: record_json(record), CARD_NAME: card(result, record, output)}


# The model card's metadata, as the Hub reads it (huggingface/hub-docs modelcard.md: "Properties will be
# validated by the Hub when git pushing changes to your README.md file"; model-cards.md, "Specifying a library",
# "Specifying a base model", "Specifying a task (`pipeline_tag`)"):
# - `base_model` is a Hub model id, or a list of them for a merge ("specified by their Hub identifiers";
#   huggingface_hub ModelCardData: "The value must be the ID of a model on the Hub"). A local path is refused on
#   push (transformers issue #33922, PR #28482), so it goes in the card's text instead (hub.model_id decides).
# - `base_model_relation` is one of "adapter", "merge", "quantized", "finetune" (model-cards.md: the Hub infers it
#   from the files, "but you can also set it explicitly"); written only with a base_model, which it qualifies.
# - `library_name` is stated explicitly: repositories created after August 2024 are no longer assumed to be
#   transformers from a config.json (model-cards.md), and peft's own card writes "peft" for adapters
#   (peft PeftModel.create_or_update_model_card).
# - `pipeline_tag` is one of huggingface.js packages/tasks/src/pipelines.ts PIPELINE_DATA's keys; peft's task types
#   map onto them below. A full model's card leaves it out: "for transformers models, the pipeline tag is
#   automatically inferred from the model's config.json" (model-cards.md), which knows a vision-language base from
#   a text-only one where the adapters' CAUSAL_LM does not.
# - tags are free; peft tags an adapter "base_model:adapter:<base>" (PeftModel._get_peft_specific_model_tags).
PIPELINE_TAGS = {
    "CAUSAL_LM": "text-generation",
    "SEQ_2_SEQ_LM": "text2text-generation",
    "SEQ_CLS": "text-classification",
    "TOKEN_CLS": "token-classification",
    "QUESTION_ANS": "question-answering",
    "FEATURE_EXTRACTION": "feature-extraction",
}
# The transformers class a full model of each task type loads with (its Auto class; AutoModel for features).
_AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def card_metadata(result: MergeResult, record: Mapping) -> dict:
    """The model card's YAML metadata: for a merged adapter (library peft, relation adapter to the base model),
    or, when record["options"] has "fold_into", for the full model (library transformers, relation merge, the
    base model and the source adapters read from the Hub as its base_model list). Only Hub ids are named."""
    task = result.adapter.config.get("task_type")
    adapter_base = hub.model_id(result.adapter.base_model)
    if record["options"].get("fold_into") is None:
        metadata = {"library_name": "peft", "pipeline_tag": PIPELINE_TAGS.get(task), "tags": ["lora", "nan-peft", "merge"]}
        if adapter_base:
            metadata.update(base_model=adapter_base, base_model_relation="adapter")
            metadata["tags"].append(f"base_model:adapter:{adapter_base}")
        return metadata
    fold_hub = record.get("fold_into_hub")
    # the base as given when it came from the Hub; else the adapters' base (a local copy of it, most often)
    base = fold_hub["repo_id"] if fold_hub else adapter_base
    parents = list(dict.fromkeys([*([base] if base else []), *(e["hub"]["repo_id"] for e in record["inputs"] if "hub" in e)]))
    metadata = {"library_name": "transformers", "tags": ["nan-peft", "merge"]}
    if parents:
        metadata.update(base_model=parents[0] if len(parents) == 1 else parents, base_model_relation="merge")
    return metadata


def front_matter(metadata: Mapping) -> list[str]:
    """The card's YAML block, written by huggingface_hub's ModelCardData (the Hub's own metadata class; importing
    it loads neither torch nor peft nor transformers). None values are left out."""
    from huggingface_hub import ModelCardData

    return ["---", *ModelCardData(**{k: v for k, v in metadata.items() if v is not None}).to_yaml().splitlines(), "---"]


def model_card(result: MergeResult, record: Mapping, output: str) -> str:
    """README.md for the merged adapter: what went in, with which coefficients, and how to load it with peft."""
    base = result.adapter.base_model
    options = record["options"]
    combine = options.get("combine", "cat")
    how = (
        "exactly (the factors are concatenated, rank = sum of the ranks)"
        if combine == "cat"
        else f"into rank {result.rank} by an SVD of the merged update (the best rank-{result.rank} approximation)"
    )
    lines = [
        *front_matter(card_metadata(result, record)),
        "",
        "# Merged LoRA adapter",
        "",
        f"Made by nan-peft {record['nan_peft_version']} from {len(record['inputs'])} LoRA adapters with "
        f"{_rule_text(record)}, merged {how}.",
        "",
        _base_sentence(base),
        "",
        *_inputs_table(record),
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
        + _serving_sentence(result, record),
        "",
        *_reproduce(record),
    ]
    return "\n".join(lines)


def folded_model_card(result: MergeResult, record: Mapping, output: str) -> str:
    """README.md for a full model: the base model with the merged update folded in, and how to load it."""
    given = record["options"]["fold_into"]
    fold_hub = record.get("fold_into_hub")
    folded = _linked(given, fold_hub) if fold_hub else f"`{given}`"
    loader = _AUTO_CLASSES.get(result.adapter.config.get("task_type"), "AutoModelForCausalLM")
    lines = [
        *front_matter(card_metadata(result, record)),
        "",
        "# Merged model",
        "",
        f"Made by nan-peft {record['nan_peft_version']}: the base model {folded} with the merged update of "
        f"{len(record['inputs'])} LoRA adapters folded into its weights (W' = W + sum_k c_k dW_k, the exact update, "
        f"never truncated), with {_rule_text(record)}.",
        "",
        _base_sentence(result.adapter.base_model, trained=True),
        "",
        *_inputs_table(record),
        "",
        "## Load it",
        "",
        "```python",
        f"from transformers import {loader}",
        "",
        f"model = {loader}.from_pretrained({json.dumps(output)})",
        "```",
        "",
        *_reproduce(record),
    ]
    return "\n".join(lines)


def _rule_text(record: Mapping) -> str:
    """"<coefficient rule>, granularity `g`, plugged into the `rule` merge rule (options)"."""
    options = record["options"]
    coefficients = record["coefficients"]
    method = coefficients["method"]
    rule = {
        "nan": "NAN (arXiv 2505.16148): each coefficient is proportional to the inverse Frobenius norm of the adapter's update",
        "uniform": "uniform coefficients",
        "manual": "weights given by hand",
    }.get(method, method)
    rule_name = options.get("method", "task_arithmetic")
    rule_options = ", ".join(f"{key} {options[key]}" for key in ("density", "scale", "normalize", "seed") if options.get(key) is not None)
    if options.get("scale_chosen") is not None:  # --scale auto: the number it chose
        rule_options = rule_options.replace("scale auto", f"scale auto = {options['scale_chosen']:.6g}")
    plugged = f"plugged into the `{rule_name}` merge rule" + (f" ({rule_options})" if rule_options else "")
    return f"{rule}, granularity `{coefficients['granularity']}`, {plugged}"


def _base_sentence(base: str | None, trained: bool = False) -> str:
    """Where the adapters' base model is named: a Hub id is linked (and is the card's base_model), a local path
    is said here only (the Hub refuses it as metadata)."""
    subject = "The adapters were trained on" if trained else "Base model:"
    if not base:
        return f"{subject} a base model their configs do not name." if trained else "Base model: not named in the adapters' configs."
    if hub.model_id(base):
        return f"{subject} [`{base}`]({hub.HUB_URL}/{base})."
    return f"{subject} `{base}` (not a Hub model id, so the card's metadata does not name it as base_model)."


def _inputs_table(record: Mapping) -> list[str]:
    rows = ["| adapter | path | norm ‖ΔW‖_F | coefficient |", "|---|---|---:|---:|"]
    per_adapter = record["coefficients"]["per_adapter"]
    for entry in record["inputs"]:
        name = entry["name"]
        c = f"{per_adapter[name]:.6g}" if per_adapter is not None else "per module"
        path = _linked(entry["path"], entry["hub"]) if "hub" in entry else f"`{entry['path']}`"
        rows.append(f"| {name} | {path} | {record['norms'][name]:.6g} | {c} |")
    return rows


def _linked(given: str, source: Mapping) -> str:
    """A Hub input as given, linked to the folder at the commit that was read."""
    ref = hub.HubRef(source["repo_id"], source.get("revision"), source.get("subfolder"))
    return f"[`{given}`]({ref.url(source['commit'])})"


def _reproduce(record: Mapping) -> list[str]:
    pinned = []
    if any("hub" in entry for entry in record["inputs"]) or record.get("fold_into_hub"):
        pinned = [
            f"Inputs from the Hub were read at the commits {RECORD_NAME} records (`hub.commit`); giving them as "
            "`org/name@<commit>` reads the same files again.",
            "",
        ]
    return [
        "## Reproduce it",
        "",
        f"{RECORD_NAME} holds the inputs' sha256, every option, the norms and coefficients and the per-module "
        "truncation error. Run again from the same folder, this command writes the same bytes:",
        "",
        "```",
        shlex.join(record["command"]),
        "```",
        "",
        *pinned,
    ]


def _serving_sentence(result: MergeResult, record: Mapping) -> str:
    """Which serving engines serve the merged adapter (written at the record's rank, for its tensor-parallel
    degree) as peft does."""
    findings = written_findings(result.adapter, record["rank"], record["options"].get("tensor_parallel") or 1)
    labels = {name: profile.label for name, profile in PROFILES.items() if name != "peft"}
    refused = [label for engine, label in labels.items() if not loads(findings[engine])]
    if not refused:
        return f"so the serving engines ({', '.join(labels.values())}) serve it as peft does; `nan-peft inspect` checks this and prints their flags."
    loaded = [label for label in labels.values() if label not in refused]
    return (f"but {', '.join(refused)} would not serve it as peft does (`nan-peft inspect` says why)"
            + (f"; {', '.join(loaded)} serve{'s' if len(loaded) == 1 else ''} it as is." if loaded else "."))
