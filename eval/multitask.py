"""Experiment 2's multi-task merge: every rule x {uniform, NAN}, its scale chosen on the validation split, the
test split scored once at that scale, at --scale auto and (task arithmetic) at total 1.

Per LoRA setting and seed, each task's adapter is trained with its own head (lora_tasks.train_all). The merges
are built by nan_peft.merge_adapters; every task is then scored through its own head on the merged encoder.

Scale. A rule's merged update at scale 1 (M, global Frobenius norm ||M||) is scored on validation at the
scales s = gamma * reference / ||M|| for gamma in GRID, reference = nan_peft.scale.reference_norm (the
|c|-weighted mean adapter norm per module): gamma is the merged update's norm in units of a typical adapter's,
so one grid serves every rule. Without calibration the merge at scale s is s M (the update is linear in the
scale), so M is built once and applied with multiplier s; with calibrate="svc" (not linear) each scale is
merged anew. The validation sweeps are cached (stage "val"), so the test stage re-merges without re-scoring them.

Normalized accuracy: a task's balanced accuracy under the merge over that of the task's own adapter alone, on
the same split (the KnOTS / Iso-C papers' normalized accuracy).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

import nan_peft
from nan_peft.scale import reference_norm

from .lora_tasks import adapter_dir, apply_update, derived_seed, evaluate, metrics, pooled, train_probe

GRID = (0.35, 0.5, 0.7, 1.0, 1.4, 2.0)
RULES = {  # name: (method, options); options at the papers' defaults (only the scale is chosen on validation)
    "task_arithmetic": ("task_arithmetic", {}),
    "ties": ("ties", {"density": 0.2}),
    "dare": ("dare_linear", {"density": 0.5, "seed": 0}),
    "iso_c": ("iso_c", {}),
    "iso_cts": ("iso_cts", {"common": 0.8}),
    "tsv": ("tsv", {}),
    "wudi": ("wudi", {}),
    "knots_ties": ("knots_ties", {"density": 0.2}),
    "knots_dare": ("knots_dare", {"density": 0.5, "seed": 0}),  # DARE's usual drop rate, as `dare` above
    "tsv + svc": ("tsv", {"calibrate": "svc"}),
    # svc after every other rule it can follow (nan_peft.rules.CALIBRATED)
    "task_arithmetic + svc": ("task_arithmetic", {"calibrate": "svc"}),
    "wudi + svc": ("wudi", {"calibrate": "svc"}),
    "knots_ties + svc": ("knots_ties", {"density": 0.2, "calibrate": "svc"}),
    "knots_dare + svc": ("knots_dare", {"density": 0.5, "seed": 0, "calibrate": "svc"}),
}
# the rules the auto scale's GAMMA was designed on (report_merges.design pools their validation sweeps)
AUTO_DESIGN = ("iso_c", "iso_cts", "tsv", "wudi", "knots_ties", "tsv + svc")
SPECTRAL = ("iso_c", "iso_cts", "tsv", "wudi", "knots_ties", "knots_dare", "tsv + svc", "task_arithmetic + svc", "wudi + svc",
            "knots_ties + svc", "knots_dare + svc")
COEFFICIENTS = ("uniform", "nan")


def merge(paths: list[Path], rule: str, coefficients: str, rank: int, scale=None, calibrate: bool = True) -> nan_peft.MergeResult:
    """The merge of `rule` (RULES) with coefficients summing to 1; entry-wise rules combined by svd at the
    modules' smaller dimension (nothing truncated); calibrate=False leaves svc out (the rule at scale 1)."""
    method, options = RULES[rule]
    options = dict(options)
    if not calibrate:
        options.pop("calibrate", None)
    combine = {"combine": "svd", "rank": rank} if method in ("ties", "dare_linear") else {}
    return nan_peft.merge_adapters([str(p) for p in paths], coefficients=coefficients, total=1.0, method=method,
                                   scale=scale, **combine, **options)


def merged_norm(result: nan_peft.MergeResult) -> float:
    return math.sqrt(sum(r.norm ** 2 for r in result.report))


@contextmanager
def applied(bert, adapter: nan_peft.LoraAdapter | None, multiplier: float = 1.0):
    """The encoder with W + multiplier * dW at every module of `adapter`, restored exactly afterwards."""
    if adapter is None:
        yield
        return
    saved = {path: bert.get_submodule(path).weight.detach().clone() for path in adapter.modules}
    apply_update(bert, adapter, multiplier)
    try:
        yield
    finally:
        with torch.no_grad():
            for path, weight in saved.items():
                bert.get_submodule(path).weight.copy_(weight)


def row(setting: str, seed: int, name: str, kind: str, split: str, scores: dict, alone: dict | None, **extra) -> dict:
    """One scored model on one split: balanced accuracy and accuracy per task, their means, and (with `alone`,
    each task's own adapter's balanced accuracy on that split) the normalized accuracy."""
    balanced = {t: s["balanced"] for t, s in scores.items()}
    accuracy = {t: s["accuracy"] for t, s in scores.items()}
    out = {"setting": setting, "seed": seed, "name": name, "kind": kind, "split": split, "balanced": balanced,
           "accuracy": accuracy, "mean_balanced": sum(balanced.values()) / len(balanced),
           "mean": sum(accuracy.values()) / len(accuracy), **extra}
    if alone:
        out["normalized"] = {t: balanced[t] / alone[t] for t in balanced}
        out["mean_normalized"] = sum(out["normalized"].values()) / len(balanced)
    return out


def best_gamma(sweep: dict) -> float:
    """The grid's gamma with the highest mean normalized validation accuracy (the smaller one on a tie)."""
    return max(sorted(sweep, key=float), key=lambda g: sweep[g]["mean_normalized"])


def score_all(setup, cache: Path, bert, data: dict, plan: dict, stage: str = "all", log=print) -> list[dict]:
    tasks = list(data)
    rank = min(bert.config.hidden_size, bert.config.intermediate_size)
    sets = {split: {t: (data[t]["states"][i], data[t]["mask"][i], data[t]["y"][i])
                    for t in tasks for i in [torch.tensor(plan[t][split])]} for split in ("val", "test")}
    features = {t: pooled(bert, data[t]["states"], data[t]["mask"], setup.split) for t in tasks}
    rows = []
    for setting in setup.settings():
        for seed in setup.seeds:
            start = time.time()
            folder = cache / setting / f"seed{seed}"
            heads = {}
            for t in tasks:
                heads[t] = nn.Linear(bert.config.hidden_size, len(data[t]["classes"]))
                heads[t].load_state_dict(torch.load(adapter_dir(cache, setting, seed, t) / "head.pt", weights_only=True))
            paths = [adapter_dir(cache, setting, seed, t) / "adapter" for t in tasks]

            def score(adapter, split: str, multiplier: float = 1.0, only: list | None = None) -> dict:
                with applied(bert, adapter, multiplier):
                    return {t: evaluate(bert, heads[t], *sets[split][t], setup.split) for t in (only or tasks)}

            cached = folder / "val-scores.json"
            fixed = json.loads(cached.read_text()) if cached.exists() else None
            if fixed is None or any(f"{rule}/{c}" not in fixed["sweeps"] for rule in RULES for c in COEFFICIENTS):
                fixed = fixed_rows(setting, seed, tasks, data, plan, features, paths, score, rank, log, fixed)
                cached.write_text(json.dumps(fixed))
            rows += fixed["rows"]
            if stage == "all":
                rows += test_rows(setting, seed, fixed, paths, score, rank)
            log(f"{setting} seed {seed}: scored in {time.time() - start:.0f} s")
    return rows


def fixed_rows(setting, seed, tasks, data, plan, features, paths, score, rank, log, cached: dict | None = None) -> dict:
    """What needs no choice (probe, base, each adapter alone, on both splits) and every rule's validation sweep;
    with `cached` (an earlier result of this function), only the sweeps of rules it lacks are added to it."""
    if cached is not None:
        return {**cached, **_sweeps(setting, seed, paths, score, rank, log, cached["alone"], cached["sweeps"], cached["rows"])}
    rows = []
    probe = {}
    for split in ("val", "test"):
        scores = {}
        for t in tasks:
            train_idx, idx = torch.tensor(plan[t]["train"][seed]), torch.tensor(plan[t][split])
            if t not in probe:
                probe[t] = train_probe(features[t][train_idx], data[t]["y"][train_idx], len(data[t]["classes"]),
                                       derived_seed(seed, f"probe/{t}"))
            with torch.no_grad():
                scores[t] = metrics(probe[t](features[t][idx]).argmax(-1), data[t]["y"][idx])
        rows.append(row(setting, seed, "linear probe (no adapter)", "reference", split, scores, None))
    rows.append(row(setting, seed, "base encoder + task heads", "reference", "test", score(None, "test"), None))
    sources = nan_peft.read_adapters([str(p) for p in paths])
    norms = dict(zip(tasks, nan_peft.update_gram(sources).adapter_norms.tolist()))
    alone = {}
    for split in ("val", "test"):
        alone[split] = {}
        for t, source in zip(tasks, sources):
            scores = score(source, split)
            alone[split][t] = scores[t]["balanced"]
            rows.append(row(setting, seed, f"adapter {t} alone", "individual", split, scores, None, norms=norms))
    return {"alone": alone, "norms": norms, **_sweeps(setting, seed, paths, score, rank, log, alone, {}, rows)}


def _sweeps(setting, seed, paths, score, rank, log, alone, sweeps: dict, rows: list) -> dict:
    """{"rows", "sweeps"}: `rows` and `sweeps` with the validation sweep of every rule x coefficients they lack."""
    rows, sweeps = list(rows), dict(sweeps)
    for rule in RULES:
        for coefficients in COEFFICIENTS:
            if f"{rule}/{coefficients}" in sweeps:
                continue
            began = time.time()
            raw = merge(paths, rule, coefficients, rank, calibrate=False)
            reference, norm = reference_norm(raw.gram.module_norms, raw.coefficients.values), merged_norm(raw)
            sweep = {}
            for gamma in GRID:
                scale = gamma * reference / norm
                if "calibrate" in RULES[rule][1]:
                    adapter, multiplier = merge(paths, rule, coefficients, rank, scale=scale).adapter, 1.0
                else:
                    adapter, multiplier = raw.adapter, scale
                sweep[str(gamma)] = row(setting, seed, rule, "sweep", "val", score(adapter, "val", multiplier), alone["val"],
                                        rule=rule, coefficients=coefficients, gamma=gamma, scale=scale)
            rows += sweep.values()
            sweeps[f"{rule}/{coefficients}"] = {"reference": reference, "norm": norm,
                                                "coefficients": raw.coefficients.values.mean(0).tolist()}
            log(f"{setting} seed {seed} {rule} {coefficients}: val sweep in {time.time() - began:.0f} s, best gamma "
                f"{best_gamma(sweep)} ({max(r['mean_normalized'] for r in sweep.values()):.3f})")
    return {"rows": rows, "sweeps": sweeps}


def test_rows(setting, seed, fixed, paths, score, rank) -> list[dict]:
    """Each rule x coefficients on the test split: at the gamma chosen on validation, at --scale auto, and
    task arithmetic at total 1 (scale 1: the plain average, the default merge)."""
    rows, alone = [], fixed["alone"]["test"]
    val = {}
    for r in fixed["rows"]:
        if r["kind"] == "sweep":
            val.setdefault(f"{r['rule']}/{r['coefficients']}", {})[str(r["gamma"])] = r
    for rule in RULES:
        for coefficients in COEFFICIENTS:
            key = f"{rule}/{coefficients}"
            info, gamma = fixed["sweeps"][key], best_gamma(val[key])
            scale = float(gamma) * info["reference"] / info["norm"]
            common = {"rule": rule, "coefficients": coefficients, "norms": fixed["norms"], "weights": info["coefficients"]}
            if "calibrate" in RULES[rule][1]:
                adapter, multiplier = merge(paths, rule, coefficients, rank, scale=scale).adapter, 1.0
            else:
                adapter, multiplier = merge(paths, rule, coefficients, rank, calibrate=False).adapter, scale
            chosen_scores = score(adapter, "test", multiplier)
            rows.append(row(setting, seed, rule, "val-chosen", "test", chosen_scores, alone, gamma=float(gamma), scale=scale, **common))
            auto = merge(paths, rule, coefficients, rank, scale="auto")
            chosen = auto.options["scale_chosen"]
            same = abs(chosen - scale) <= 1e-9 * scale  # the same update (up to rounding): scored once
            rows.append(row(setting, seed, rule, "auto", "test", chosen_scores if same else score(auto.adapter, "test"), alone,
                            scale=chosen, gamma=chosen * info["norm"] / info["reference"], same_as_val_chosen=same, **common))
            if rule == "task_arithmetic":
                rows.append(row(setting, seed, rule, "total 1", "test", score(merge(paths, rule, coefficients, rank).adapter, "test"),
                                alone, gamma=info["norm"] / info["reference"], scale=1.0, **common))
    return rows
