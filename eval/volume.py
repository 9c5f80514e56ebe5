"""Experiment 2's volume scenario, the paper's own premise on a real network: one task, adapters trained on disjoint
samples of different sizes through one frozen, randomly initialised shared head, merged and scored on that task."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import BertModel

import nan_peft

from .lora_tasks import Setup, apply_update, derived_seed, evaluate, merge, metric_row, spec_name, train_adapter


def volume_dirs(setup: Setup, cache: Path, seed: int) -> list[Path]:
    return [cache / f"seed{seed}" / f"same-task-{n}" for n in setup.volume_sizes]


def train_volume(setup: Setup, cache: Path, bert: BertModel, data: dict, plan: dict, seed: int, log=print) -> list[dict]:
    """The same task at different data volumes, through one frozen head shared by the three adapters. The head
    is random (seeded): a trained head would already solve this task on MiniLM's features and leave the
    adapters nothing to learn; with a random one all of the task is learnt by the adapters."""
    d, parts = data[setup.volume_task], plan[setup.volume_task]["volume"][seed]
    dirs = volume_dirs(setup, cache, seed)
    if all((p / "train.json").exists() for p in dirs):
        return [json.loads((p / "train.json").read_text()) for p in dirs]
    torch.manual_seed(derived_seed(seed, "same-task head"))
    head = nn.Linear(bert.config.hidden_size, len(d["classes"]))
    for p in head.parameters():
        p.requires_grad_(False)
    logs = []
    for part, out in zip(parts, dirs):
        idx = torch.tensor(part)
        entry = train_adapter(bert, setup, out.name, d["states"][idx], d["mask"][idx], d["y"][idx],
                              len(d["classes"]), seed, out, head=head)
        log(f"seed {seed} {out.name} ({setup.volume_task}, frozen shared head): {entry['epochs']:.1f} epochs, "
            f"loss {entry['first_loss']:.2f} -> {entry['last_loss']:.2f}, {entry['seconds']:.0f} s")
        logs.append(entry)
    return logs


def score_volume(setup: Setup, cache: Path, bert: BertModel, data: dict, plan: dict, log=print) -> list[dict]:
    """The volume scenario: every merge of the same-task adapters, scored on that task."""
    task = setup.volume_task
    rank = min(bert.config.hidden_size, bert.config.intermediate_size)
    idx = torch.tensor(plan[task]["test"])
    test = (data[task]["states"][idx], data[task]["mask"][idx], data[task]["y"][idx])
    sizes = list(setup.volume_sizes)
    share = [n / sum(sizes) for n in sizes]
    specs = [{"method": "task_arithmetic", "coefficients": c, "total": 1.0} for c in ("uniform", "nan")]
    specs += [{"method": "task_arithmetic", "coefficients": "nan", "total": 1.0, "exponent": 2.0},
              {"method": "task_arithmetic", "coefficients": "nan", "total": 1.0, "granularity": "module"},
              {"method": "task_arithmetic", "coefficients": share, "total": 1.0}]
    specs += [{"method": "ties", "coefficients": c, "density": 0.2, "total": 1.0} for c in ("uniform", "nan")]
    rows = []
    for seed in setup.seeds:
        dirs = volume_dirs(setup, cache, seed)
        head = nn.Linear(bert.config.hidden_size, len(data[task]["classes"]))
        head.load_state_dict(torch.load(dirs[0] / "head.pt", weights_only=True))
        sources = nan_peft.read_adapters([str(p / "adapter") for p in dirs])
        norms = dict(zip(map(str, sizes), nan_peft.update_gram(sources).adapter_norms.tolist()))

        def score(adapter):
            if adapter is not None:
                apply_update(bert, adapter)
            try:
                return {task: evaluate(bert, head, *test, setup.split)}
            finally:
                if adapter is not None:
                    apply_update(bert, adapter, -1.0)

        def row(name, scores, **extra):
            rows.append(metric_row(seed, name, scores, norms=norms, **extra))

        row("shared head on the base encoder", score(None))
        for n, source in zip(sizes, sources):
            row(f"adapter {n} alone", score(source))
        for spec in specs:
            result = merge([p / "adapter" for p in dirs], spec, seed, rank)
            name = spec_name(spec) if isinstance(spec["coefficients"], str) else "task_arithmetic/data volume/total1"
            row(name, score(result.adapter), spec={**spec, "coefficients": str(spec["coefficients"])},
                coefficients=dict(zip(map(str, sizes), result.coefficients.values.mean(0).tolist())))
    log(f"volume scenario: scored {len(rows)} models")
    return rows
