"""Merge full fine-tuned checkpoints (and LoRA adapters) of one base, as task vectors tau_k = W_k - W_0:
read -> inner products <tau_i, tau_j> (float64, tensor by tensor) -> coefficients (NAN: the inverse norm of each
whole task vector, the paper's form; or per tensor) -> W_0 + rule(c, tau) per tensor, written as a full
checkpoint in the base's shard layout, names and dtypes, published atomically with a record and a card.

Two passes over the inputs with NAN coefficients (the norms first); one with manual or uniform ones (the norms
are then recorded from the same pass)."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__, hub
from ..coefficients import Coefficients, coefficients_for
from ..errors import NanPeftError
from ..fold.checkpoint import INDEX_NAME, MODEL_CONFIG_NAME, copy_other_files
from ..norms import UpdateGram
from ..publish import check_output, publish_folder, write_files
from ..reader import read_adapters
from ..record import CARD_NAME, RECORD_FORMAT, RECORD_NAME, front_matter, input_entry, record_json, sha256_file
from ..rules import rule_options
from ..spec import MergeSpec
from .inputs import FullPlan, is_checkpoint, plan_full
from .stream import check_finite, each_tensor, inner_products, merged_update, write_checkpoint


@dataclass
class FullMerge:
    """A full-checkpoint merge: its plan, the task vectors' inner products and the coefficients used."""

    plan: FullPlan
    gram: UpdateGram
    coefficients: Coefficients
    record: dict
    folder: Path | None = None

    @property
    def norms(self) -> dict[str, float]:
        """||tau_k|| of each input's whole task vector."""
        return dict(zip(self.gram.adapter_names, self.gram.adapter_norms.tolist()))


def read_plan(base, paths: Sequence, vocab: str | None = None, allow_different_bases: bool = False) -> FullPlan:
    """The plan of a merge of `paths` (full checkpoints, recognised by their files, and adapters) onto `base`."""
    positions = [k for k, path in enumerate(paths) if not is_checkpoint(path)]
    adapters = read_adapters([paths[k] for k in positions], allow_different_bases=allow_different_bases) if positions else []
    return plan_full(base, paths, dict(zip(positions, adapters)), vocab)


def task_vector_gram(plan: FullPlan, device="cpu") -> UpdateGram:
    """<tau_i, tau_j> at every float tensor (one pass over the inputs, a tensor at a time); NaN refused."""
    gram = empty_gram(plan)
    m = 0  # not enumerate: its reused result tuple would hold the last tensors while the next ones are read
    for name, _, members, taus in each_tensor(plan, torch.device(device)):
        _accumulate(gram, plan, m, name, members, taus)
        m += 1
        del taus, _
    return gram


def merge_checkpoints(
    base: str | os.PathLike,
    paths: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    spec: MergeSpec | None = None,
    *,
    vocab: str | None = None,
    overwrite: bool = False,
    command: Sequence[str] = (),
    recipe: dict | None = None,
) -> FullMerge:
    """Write W_0 + rule(c, tau) for every tensor of `base` to `output` (atomically); see the module docstring.

    paths: full fine-tunes of `base` (folders with config.json and safetensors weights) and LoRA adapters,
    mixed freely. spec: the merge's options (MergeSpec: coefficients, granularity "adapter" for one norm over
    the whole model or "module" for one per tensor, method and its options, device); rank and truncation do
    not apply (the merge is exact). vocab: None refuses inputs whose vocabulary differs from the base's,
    "base" keeps the base's rows, "union" all (nan_peft.full.stream)."""
    spec = spec or MergeSpec()
    if spec.rank is not None or spec.truncation_given:
        raise NanPeftError("a full-checkpoint merge is exact: --rank and the truncation options do not apply")
    if spec.dtype is not None:
        raise NanPeftError("a full-checkpoint merge writes each tensor in the base's dtype: --dtype does not apply")
    if spec.scale == "auto":  # nan_peft.scale measures the merged LoRA factors' report, which this path does not build
        raise NanPeftError("--scale auto is for LoRA merges; give a full-checkpoint merge a number")
    given, seed = rule_options(spec.method, spec.rule_given)
    shown = str(output)  # as given: the card names no temporary or absolute path
    output = check_output(output, overwrite)
    plan = read_plan(base, [str(p) for p in paths], vocab, spec.allow_different_bases)
    if any(output.resolve() == Path(p).resolve() for p in (plan.base.folder, *(s.path for s in plan.sources))):
        raise NanPeftError(f"{output} is an input: write the merge to a new folder")
    device = torch.device(spec.device)
    nan = spec.coefficients == "nan"
    gram = task_vector_gram(plan, device) if nan else empty_gram(plan)
    coefficients = coefficients_for(spec.coefficients, gram, **spec.provider_given)
    done = FullMerge(plan, gram, coefficients, {})

    def write(tmp: Path) -> None:
        tensors = each_tensor(plan, device)
        values, position = coefficients.values, {name: m for m, name in enumerate(plan.tensors)}

        def merged(name: str) -> torch.Tensor:  # called in plan.tensors order, as each_tensor yields them
            read, weight, members, taus = next(tensors)
            m = position[name]
            assert read == name, (read, name)
            if not nan:
                _accumulate(gram, plan, m, name, members, taus)
            update = merged_update(taus, values[m, members], name, spec.method, given, seed)
            del taus
            return weight.add_(update)

        write_checkpoint(plan, merged, tmp)
        copy_other_files(plan.tokenizer_from, tmp)
        done.record = full_record(done, spec, base, paths, vocab, command, recipe)
        write_files(tmp, {RECORD_NAME: record_json(done.record), CARD_NAME: full_card(done.record, shown)})

    protected = [plan.base.folder, *(s.path for s in plan.sources)]
    done.folder = publish_folder(output, write, overwrite, protected)
    return done


def empty_gram(plan: FullPlan) -> UpdateGram:
    present = torch.tensor([[s.has(name) for s in plan.sources] for name in plan.tensors], dtype=torch.bool)
    inner = torch.zeros((len(plan.tensors), len(plan.sources), len(plan.sources)), dtype=torch.float64)
    return UpdateGram(plan.names, tuple(plan.tensors), inner, present.reshape(len(plan.tensors), len(plan.sources)))


def _accumulate(gram: UpdateGram, plan: FullPlan, m: int, name: str, members: list[int], taus: torch.Tensor) -> None:
    products = inner_products(taus)
    check_finite(products, plan, name, members)
    index = torch.tensor(members)
    gram.inner[m, index[:, None], index[None, :]] = products


def full_record(done: FullMerge, spec: MergeSpec, base, paths, vocab, command, recipe) -> dict:
    """merge_record.json of a full merge: the inputs (config and index sha256 for a checkpoint, the files read
    for an adapter), options, norms, inner products and coefficients."""
    plan, coefficients, names = done.plan, done.coefficients, list(done.gram.adapter_names)
    inputs = []
    for path, source in zip(paths, plan.sources):
        if source.checkpoint is None:
            entry = input_entry(str(path), source.adapter.source, source.name, source.adapter.digests)
        else:
            entry = {"name": source.name, "path": str(path), "sha256": _checkpoint_digests(source.checkpoint.folder)}
        inputs.append({**entry, "kind": source.kind})
    options = {key: value for key, value in spec.record_options(coefficients.granularity, torch.float32).items()
               if key not in ("combine", "rank", "dtype")}
    per_adapter = coefficients.per_adapter
    record = {
        "format": RECORD_FORMAT,
        "nan_peft_version": __version__,
        "command": list(command),
        "base": {"path": str(base), "sha256": _checkpoint_digests(plan.base.folder)},
        "inputs": inputs,
        "options": {**options, "vocab": vocab, "device": spec.device, "dtype": "base"},
        "norms": done.norms,
        "inner_products": done.gram.adapter_inner.tolist(),
        "coefficients": {
            "method": coefficients.method,
            "granularity": coefficients.granularity,
            "per_adapter": None if per_adapter is None else dict(zip(names, per_adapter.tolist())),
            "per_module": None if per_adapter is not None
            else {name: dict(zip(names, row)) for name, row in zip(coefficients.modules, coefficients.values.tolist())},
        },
        "tensors": len(plan.tensors),
    }
    if recipe is not None:
        record["recipe"] = dict(recipe)
    return record


def _checkpoint_digests(folder: Path) -> dict[str, str]:
    """sha256 of the files that name a checkpoint's weights and shapes (config.json and the shard index); the
    weights themselves are not hashed (gigabytes, read twice already)."""
    return {file: sha256_file(folder / file) for file in (MODEL_CONFIG_NAME, INDEX_NAME) if (folder / file).is_file()}


def full_card(record: dict, output: str) -> str:
    """README.md of the merged full model."""
    base = record["base"]["path"]
    metadata = {"library_name": "transformers", "tags": ["nan-peft", "merge"]}
    if hub.model_id(base):
        metadata.update(base_model=base, base_model_relation="merge")
    c = record["coefficients"]["per_adapter"]
    rows = []
    for entry in record["inputs"]:
        name = entry["name"]
        coefficient = "per tensor" if c is None else f"{c[name]:.6g}"
        rows.append(f"| {name} | {entry['kind']} | `{entry['path']}` | {record['norms'][name]:.6g} | {coefficient} |")
    return "\n".join([
        *front_matter(metadata), "", "# Merged model", "",
        f"Made by nan-peft {record['nan_peft_version']}: the base model `{base}` plus the `{record['options']['method']}` merge of "
        f"{len(record['inputs'])} task vectors (tau_k = W_k - W_0; a LoRA adapter's is s B A), with {record['coefficients']['method']} "
        f"coefficients (granularity `{record['coefficients']['granularity']}`), tensor by tensor.", "",
        "| input | kind | path | norm ‖τ‖ | coefficient |", "|---|---|---|---:|---:|", *rows, "",
        "## Load it", "", "```python", "from transformers import AutoModelForCausalLM", "",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(output)})", "```", "",
        "## Reproduce it", "", f"{RECORD_NAME} holds every option, the norms, inner products and coefficients. The command:", "",
        "```", shlex.join(record["command"]), "```", "",
    ])
