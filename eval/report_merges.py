"""Tables (markdown) and plots (PNG) of experiment 2's multi-task merges (eval/multitask.py's rows).

Every choice is read off the validation rows (split "val"); the test rows are only reported. Means are over
seeds, ± the standard deviation over seeds; paired differences are taken seed by seed on the same adapters.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from nan_peft.scale import GAMMA

from .gamma import curves
from .multitask import AUTO_DESIGN, GRID, RULES, SPECTRAL


def _ms(values, scale: float = 100.0, signed: bool = False) -> str:
    v = np.asarray(values, dtype=float) * scale
    if v.size == 0:
        return ""
    sign = "+" if signed else ""
    return f"{v.mean():{sign}.1f} ± {v.std():.1f}" if v.size > 1 else f"{v.mean():{sign}.1f}"


def _by(rows, **match) -> list[dict]:
    return sorted((r for r in rows if all(r.get(k) == v for k, v in match.items())), key=lambda r: r["seed"])


def tasks_of(results: dict) -> list[str]:
    return list(results["setup"]["train_sizes"])


def settings_of(results: dict) -> list[str]:
    return list(dict.fromkeys(r["setting"] for r in results["rows"]))


def val_curves(rows, setting: str) -> dict:
    """{rule/coefficients: {gamma: [mean normalized val accuracy per seed]}}."""
    out = defaultdict(lambda: defaultdict(list))
    for r in _by(rows, setting=setting, kind="sweep"):
        out[f"{r['rule']}/{r['coefficients']}"][r["gamma"]].append(r["mean_normalized"])
    return out


def design(rows) -> dict:
    """The auto rule's evidence: per gamma, the mean normalized validation accuracy of the rules it was designed on
    (AUTO_DESIGN; both coefficient kinds, every setting and seed), and each rule's own best gamma."""
    best = {}
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for key, curve in val_curves(rows, setting).items():
            means = {g: float(np.mean(v)) for g, v in curve.items()}
            best[f"{setting} {key}"] = max(means, key=means.get)
    return {"pooled": curves(rows), "best": best}


def decision(results: dict) -> list[str]:
    """Item 5: per setting, the spectral rule x coefficients with --scale auto that scores best on validation
    (its sweep row at GAMMA), and its test mean normalized accuracy against task arithmetic at total 1."""
    rows, lines = results["rows"], []
    for setting in settings_of(results):
        at = [r for r in _by(rows, setting=setting, kind="sweep") if r["rule"] in SPECTRAL and abs(r["gamma"] - GAMMA) < 1e-9]
        if not at:
            continue
        score = defaultdict(list)
        for r in at:
            score[(r["rule"], r["coefficients"])].append(r["mean_normalized"])
        rule, coefficients = max(score, key=lambda k: np.mean(score[k]))
        chosen = {r["seed"]: r["mean_normalized"] for r in _by(rows, setting=setting, kind="auto", rule=rule, coefficients=coefficients)}
        for base in ("nan", "uniform"):
            ta = {r["seed"]: r["mean_normalized"] for r in _by(rows, setting=setting, kind="total 1", rule="task_arithmetic", coefficients=base)}
            seeds = sorted(set(chosen) & set(ta))
            if seeds:
                diff = [chosen[s] - ta[s] for s in seeds]
                lines.append(f"| {setting} | {rule}, {coefficients}, auto | {_ms([chosen[s] for s in seeds])} | task arithmetic, {base}, "
                             f"total 1 | {_ms([ta[s] for s in seeds])} | {_ms(diff, signed=True)} | "
                             + " / ".join(f"{100 * d:+.1f}" for d in diff) + " |")
    if not lines:
        return []
    return ["| setting | chosen on validation | test normalized % | against | test normalized % | Δ (paired) | per seed |",
            "|---|---|---|---|---|---|---|", *lines]


def tables(results: dict) -> str:
    rows, tasks = results["rows"], tasks_of(results)
    out = []
    for setting in settings_of(results):
        out += [f"### Setting {setting}", "", "Each adapter alone on its own task against a linear probe on the frozen encoder "
                "(test split, balanced accuracy %):", "",
                "| task | linear probe | adapter alone | adapter − probe (paired) |", "|---|---|---|---|"]
        probe = _by(rows, setting=setting, name="linear probe (no adapter)", split="test")
        for t in tasks:
            alone = _by(rows, setting=setting, name=f"adapter {t} alone", split="test")
            p, a = [r["balanced"][t] for r in probe], [r["balanced"][t] for r in alone]
            out.append(f"| {t} | {_ms(p)} | {_ms(a)} | {_ms(np.subtract(a, p), signed=True)} |")
        p = [np.mean([r["balanced"][t] for t in tasks]) for r in probe]
        a = [np.mean([_by(rows, setting=setting, name=f"adapter {t} alone", split="test", seed=s)[0]["balanced"][t] for t in tasks])
             for s in sorted({r["seed"] for r in probe})]
        out += [f"| **mean** | {_ms(p)} | {_ms(a)} | {_ms(np.subtract(a, p), signed=True)} |", ""]
        out += ["Merges (test split): mean balanced accuracy over the tasks (absolute) and mean normalized accuracy "
                "(each task's balanced accuracy over its own adapter's), at the scale chosen on validation (γ: the merged "
                "update's norm over the adapters' mean norm) and at `--scale auto`; Δ NAN: NAN − uniform, paired by seed.", "",
                "| rule | coefficients | γ chosen on validation | absolute | normalized | Δ NAN (normalized) | `--scale auto`: absolute | normalized | Δ NAN (normalized) |",
                "|---|---|---|---|---|---|---|---|---|"]
        for rule in RULES:
            uniform = {k: _by(rows, setting=setting, kind=k, rule=rule, coefficients="uniform") for k in ("val-chosen", "auto", "total 1")}
            for coefficients in ("uniform", "nan"):
                cells = [rule, coefficients]
                chosen = _by(rows, setting=setting, kind="val-chosen", rule=rule, coefficients=coefficients)
                cells.append(" / ".join(f"{r['gamma']:g}" for r in chosen))
                for kind in ("val-chosen", "auto"):
                    these = _by(rows, setting=setting, kind=kind, rule=rule, coefficients=coefficients)
                    cells += [_ms([r["mean_balanced"] for r in these]), _ms([r["mean_normalized"] for r in these])]
                    paired = [a["mean_normalized"] - b["mean_normalized"] for a, b in zip(these, uniform[kind])] if coefficients == "nan" else []
                    cells.append(_ms(paired, signed=True))
                out.append("| " + " | ".join(cells) + " |")
            if rule == "task_arithmetic":
                for coefficients in ("uniform", "nan"):
                    these = _by(rows, setting=setting, kind="total 1", rule=rule, coefficients=coefficients)
                    paired = [a["mean_normalized"] - b["mean_normalized"] for a, b in zip(these, uniform["total 1"])] if coefficients == "nan" else []
                    gammas = " / ".join(f"{r['gamma']:.2f}" for r in these)
                    out.append(f"| task_arithmetic, total 1 (scale 1) | {coefficients} | {gammas} (its own) | "
                               f"{_ms([r['mean_balanced'] for r in these])} | {_ms([r['mean_normalized'] for r in these])} | "
                               f"{_ms(paired, signed=True)} |  |  |  |")
        out += ["", "Per task, `--scale auto`, NAN (test, normalized accuracy %):", "",
                "| rule | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for rule in RULES:
            these = _by(rows, setting=setting, kind="auto", rule=rule, coefficients="nan")
            out.append(f"| {rule} | " + " | ".join(_ms([r["normalized"][t] for r in these]) for t in tasks) + " |")
        out += ["", "Validation sweep (mean normalized accuracy %, mean over seeds, uniform / NAN):", "",
                "| rule | " + " | ".join(f"γ {g:g}" for g in GRID) + " |", "|---|" + "---|" * len(GRID)]
        curves = val_curves(rows, setting)
        for rule in RULES:
            cells = [" / ".join(f"{100 * np.mean(curves[f'{rule}/{c}'][g]):.1f}" for c in ("uniform", "nan")) for g in GRID]
            out.append(f"| {rule} | " + " | ".join(cells) + " |")
        out.append("")
    d = design(rows)
    out += ["### The auto scale's design (validation only)", "",
            "Mean normalized validation accuracy of the rules GAMMA was designed on (" + ", ".join(AUTO_DESIGN) + "), uniform and NAN, every "
            "setting and seed, at each γ:", "", "| γ | " + " | ".join(f"{g:g}" for g in d["pooled"]) + " |",
            "|---|" + "---|" * len(d["pooled"]), "| mean normalized % | " + " | ".join(f"{100 * v:.1f}" for v in d["pooled"].values()) + " |",
            "", f"GAMMA in nan_peft/scale.py: {GAMMA:g}.", ""]
    verdict = decision(results)
    if verdict:
        out += ["### Default rule: the spectral rule chosen on validation, with `--scale auto`, against task arithmetic at total 1 (test)", "", *verdict, ""]
    return "\n".join(out)


def plots(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, written = results["rows"], []
    settings = settings_of(results)
    if not any(r["kind"] == "auto" for r in rows):
        return written
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        names = list(RULES)
        x = np.arange(len(names))
        for i, (kind, coefficients, color) in enumerate((("val-chosen", "uniform", "#9ecae1"), ("val-chosen", "nan", "#3182bd"),
                                                         ("auto", "uniform", "#fdae6b"), ("auto", "nan", "#e6550d"))):
            values = [[r["mean_normalized"] * 100 for r in _by(rows, setting=setting, kind=kind, rule=n, coefficients=coefficients)] for n in names]
            ax.bar(x + (i - 1.5) * 0.2, [np.mean(v) for v in values], 0.2, yerr=[np.std(v) for v in values], color=color,
                   label=f"{'γ chosen on validation' if kind == 'val-chosen' else 'scale auto'}, {coefficients}", capsize=2)
        ta = [r["mean_normalized"] * 100 for r in _by(rows, setting=setting, kind="total 1", rule="task_arithmetic", coefficients="nan")]
        ax.axhline(np.mean(ta), color="k", ls="--", lw=1, label="task arithmetic, NAN, total 1")
        ax.set_xticks(x, names, rotation=35, ha="right")
        ax.set_ylabel("mean normalized accuracy, test (%)")
        ax.set_title(f"setting {setting}")
        low = min(np.mean(ta), *(r["mean_normalized"] * 100 for r in rows if r["setting"] == setting and r["split"] == "test" and "mean_normalized" in r))
        ax.set_ylim(max(0, low - 5), None)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=len(labels), frameon=False)  # above the bars, not on them
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = folder / "results-lora-spectral.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.0), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        curves = val_curves(rows, setting)
        for rule in RULES:
            ys = [100 * np.mean(curves[f"{rule}/uniform"][g] + curves[f"{rule}/nan"][g]) for g in GRID]
            ax.plot(GRID, ys, marker="o", ls="-" if rule in SPECTRAL else ":", label=rule)
        ax.axvline(GAMMA, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xticks(GRID, [f"{g:g}" for g in GRID])
        ax.set_xlabel("γ = ||merged update|| / mean adapter norm")
        ax.set_ylabel("mean normalized accuracy, validation (%)")
        ax.set_title(f"setting {setting}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / "results-lora-scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
