"""The design of `--scale auto`'s GAMMA (nan_peft/scale.py) on the validation rows of both task suites.

GAMMA is the merged update's norm in units of a typical adapter's. Per suite, the validation sweeps (multitask.GRID)
of the rules it is designed on (multitask.AUTO_DESIGN), uniform and NAN, every setting and seed, are pooled into
one mean normalized accuracy per gamma; the suites count equally (their means are averaged), so that neither the
text tasks, on which the adapters barely beat a linear probe, nor the probing tasks, on which they matter, decide
alone. GAMMA is the grid's best gamma of that average. Only rows of split "val" are read: the test split plays
no part in the choice. The probing suite is probing2 (experiment 2b), the one on which every adapter clears the
linear probe by 5 points; the earlier probing suite (eval/results/probing/), whose sentiment adapter did not, is
kept as a record and no longer read.

    python -m eval.gamma        # the table, from eval/results/lora.json and eval/results/probing2/lora.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .multitask import AUTO_DESIGN, GRID

ROOT = Path(__file__).resolve().parent.parent
SUITES = {"text": ROOT / "eval" / "results" / "lora.json", "probing2": ROOT / "eval" / "results" / "probing2" / "lora.json"}


def curves(rows: list[dict], rules=AUTO_DESIGN) -> dict[float, float]:
    """{gamma: mean normalized validation accuracy} pooled over `rules`, both coefficient kinds, settings, seeds."""
    pooled = defaultdict(list)
    for r in rows:
        if r.get("kind") == "sweep" and r["split"] == "val" and r["rule"] in rules:
            pooled[r["gamma"]].append(r["mean_normalized"])
    return {g: float(np.mean(pooled[g])) for g in GRID if pooled[g]}


def design(suites: dict[str, list[dict]]) -> dict:
    """{"suites": {suite: curve}, "mean": {gamma: the suites' average}, "best": the average's best gamma (the
    smaller on a tie), "rules": {rule: {suite: its own best gamma}}, "seeds": {suite: the seeds}}."""
    each = {name: curves(rows) for name, rows in suites.items()}
    common = [g for g in GRID if all(g in c for c in each.values())]
    mean = {g: float(np.mean([c[g] for c in each.values()])) for g in common}
    rules = {}
    for rule in AUTO_DESIGN:
        rules[rule] = {}
        for name, rows in suites.items():
            c = curves(rows, (rule,))
            rules[rule][name] = max(c, key=c.get) if c else None
    seeds = {name: sorted({r["seed"] for r in rows}) for name, rows in suites.items()}
    return {"suites": each, "mean": mean, "best": max(mean, key=lambda g: (mean[g], -g)), "rules": rules, "seeds": seeds}


def table(found: dict) -> str:
    grid = list(found["mean"])
    lines = ["| suite (seeds) | " + " | ".join(f"γ {g:g}" for g in grid) + " |", "|---|" + "---|" * len(grid)]
    for name, c in found["suites"].items():
        seeds = ", ".join(map(str, found["seeds"][name]))
        lines.append(f"| {name} ({seeds}) | " + " | ".join(f"{100 * c[g]:.1f}" for g in grid) + " |")
    lines.append("| **mean of the suites** | " + " | ".join(
        f"**{100 * v:.1f}**" if g == found["best"] else f"{100 * v:.1f}" for g, v in found["mean"].items()) + " |")
    lines += ["", "Each rule's own best γ (" + " / ".join(found["suites"]) + "): " + "; ".join(
        f"{rule} " + " / ".join(f"{b:g}" if b is not None else "-" for b in best.values()) for rule, best in found["rules"].items())]
    return "\n".join(lines)


def load(paths: dict[str, Path] = SUITES) -> dict[str, list[dict]]:
    return {name: json.loads(path.read_text())["rows"] for name, path in paths.items()}


if __name__ == "__main__":
    found = design(load())
    print(table(found))
    print(f"\nbest gamma: {found['best']:g}")
