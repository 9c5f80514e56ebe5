"""Issue 18's item 5, over both task suites: should a spectral rule with `--scale auto` be the default merge?

The candidate is chosen on validation alone: the spectral rule x coefficients whose sweep row at GAMMA (what
`--scale auto` aims at) has the best mean normalized validation accuracy, averaged over the two suites (each suite:
its settings and seeds pooled). It is then compared on the test split, once, with the default (task arithmetic at
total 1, NAN and uniform), per suite and LoRA setting, paired by seed. The bar: at least 1 point of mean normalized
accuracy over seeds, in every suite and setting.

    python -m eval.defaults     # from eval/results/lora.json and eval/results/probing2/lora.json
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from nan_peft.scale import GAMMA

from .gamma import load
from .multitask import SPECTRAL

BAR = 0.01


def candidate(suites: dict[str, list[dict]]) -> tuple[tuple[str, str], dict]:
    """((rule, coefficients), {(rule, coefficients): validation score}): the best spectral rule at GAMMA on validation."""
    per_suite = defaultdict(dict)
    for name, rows in suites.items():
        pooled = defaultdict(list)
        for r in rows:
            if r.get("kind") == "sweep" and r["split"] == "val" and r["rule"] in SPECTRAL and abs(r["gamma"] - GAMMA) < 1e-9:
                pooled[(r["rule"], r["coefficients"])].append(r["mean_normalized"])
        for key, values in pooled.items():
            per_suite[key][name] = float(np.mean(values))
    score = {key: float(np.mean(list(v.values()))) for key, v in per_suite.items() if len(v) == len(suites)}
    return max(score, key=score.get), score


def compare(suites: dict[str, list[dict]], chosen: tuple[str, str]) -> list[dict]:
    """Per suite, setting and baseline coefficients: the chosen rule at --scale auto against task arithmetic at total
    1 on the test split, paired by seed."""
    rule, coefficients = chosen
    out = []
    for name, rows in suites.items():
        for setting in dict.fromkeys(r["setting"] for r in rows):
            auto = {r["seed"]: r["mean_normalized"] for r in rows if r.get("kind") == "auto" and r["setting"] == setting
                    and r["rule"] == rule and r["coefficients"] == coefficients}
            for base in ("nan", "uniform"):
                ta = {r["seed"]: r["mean_normalized"] for r in rows if r.get("kind") == "total 1" and r["setting"] == setting
                      and r["rule"] == "task_arithmetic" and r["coefficients"] == base}
                seeds = sorted(set(auto) & set(ta))
                diff = [auto[s] - ta[s] for s in seeds]
                out.append({"suite": name, "setting": setting, "baseline": base, "seeds": seeds, "chosen": [auto[s] for s in seeds],
                            "task_arithmetic": [ta[s] for s in seeds], "difference": diff})
    return out


def table(chosen: tuple[str, str], rows: list[dict]) -> str:
    def ms(values, signed=False):
        v = 100 * np.asarray(values)
        return f"{v.mean():{'+' if signed else ''}.1f} ± {v.std():.1f}"

    rule, coefficients = chosen
    lines = [f"Chosen on validation (both suites, at GAMMA = {GAMMA:g}): {rule}, {coefficients} coefficients, `--scale auto`.", "",
             "| suite | setting | chosen, test normalized % | task arithmetic, total 1 | test normalized % | Δ (paired) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['setting']} | {ms(r['chosen'])} | {r['baseline']} | {ms(r['task_arithmetic'])} | "
                     f"{ms(r['difference'], True)} | " + " / ".join(f"{100 * d:+.1f}" for d in r["difference"]) + " |")
    met = all(np.mean(r["difference"]) >= BAR for r in rows)
    lines += ["", f"The bar (at least {100 * BAR:g} point over task arithmetic at total 1 in every suite, setting and baseline): "
              + ("**met**." if met else "**not met**.")]
    return "\n".join(lines)


if __name__ == "__main__":
    suites = load()
    chosen, _ = candidate(suites)
    print(table(chosen, compare(suites, chosen)))
