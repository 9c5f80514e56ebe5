"""Full fine-tuned checkpoints as merge inputs: task vectors tau_k = W_k - W_0, streamed a tensor at a time
(inputs.py: what the inputs are and the checks against the base; stream.py: the per-tensor work and the shard
writer; merge.py: norms -> coefficients -> merge -> publish, with the record and card)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from ..errors import NanPeftError
from .inputs import FullPlan, Source, is_checkpoint, plan_full
from .merge import FullMerge, merge_checkpoints, read_plan, task_vector_gram

__all__ = ["FullMerge", "FullPlan", "Source", "check_full_options", "full_document", "is_checkpoint", "merge_checkpoints",
           "norms_sources", "plan_full", "read_plan", "task_vector_gram"]


def check_full_options(output, fold) -> None:
    """NanPeftError for OutputSpec / FoldSpec options that do not apply to a merge written as a full checkpoint."""
    given = [flag for flag, value in (("--serve", output.serve), ("--tensor-parallel", output.tensor_parallel),
                                      ("--engine-version", output.engine_version), ("--fold-into", fold.fold_into),
                                      ("--device-map", fold.device_map), ("--max-memory", fold.max_memory)) if value]
    if output.heads != "drop":
        given.append("--heads")
    if output.format != "peft":
        given.append("--format")
    if given:
        raise NanPeftError(f"full checkpoints merge into a full checkpoint in the base's layout: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply")


def norms_sources(plan: FullPlan) -> list:
    """The inputs as norms_document describes them: name, ranks (none for a full checkpoint) and the tensors
    each has a task vector in."""
    return [SimpleNamespace(name=s.name, ranks=s.adapter.ranks if s.adapter else [], modules=[n for n in plan.tensors if s.has(n)])
            for s in plan.sources]


def full_document(done: FullMerge, output) -> dict:
    """What `nan-peft merge --json` prints for a full merge: inputs with norms and coefficients, the inner
    products, the output folder and its files."""
    per_adapter = done.record["coefficients"]["per_adapter"]
    return {
        "inputs": [{"name": s.name, "path": s.path, "kind": s.kind, "norm": done.norms[s.name],
                    "coefficient": None if per_adapter is None else per_adapter[s.name]} for s in done.plan.sources],
        "inner_products": done.record["inner_products"],
        "coefficients": done.record["coefficients"],
        "options": done.record["options"],
        "tensors": len(done.plan.tensors),
        "output": str(output),
        "files": sorted(p.name for p in Path(done.folder).iterdir()),
    }
