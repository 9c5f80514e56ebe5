"""Tables (markdown) and plots (PNG) from the two experiments' results."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

THEORY_MERGES = ("uniform", "NAN p=1", "NAN p=2", "data volume", "best coefficients")


def _x(sweep: str, case: dict) -> float:
    c = case["case"]
    return {
        "volume ratio": lambda: c["volumes"][-1] / c["volumes"][0],
        "shared shift": lambda: c["shift"],
        "noise": lambda: c["sigma"],
        "dimension": lambda: c["d"],
    }.get(sweep, lambda: c["spread"])()


def theory_tables(results: dict) -> str:
    lines = [f"Median over {results['trials']} draws. *gap*: (merged loss - optimum) / (uniform's merged loss - optimum), "
             "on the summed training loss; 0 is the optimum (pooled least-squares fit), 1 is no better than uniform. "
             "*c*: mean coefficients of the three tasks (n_k = 64, 256, 1024 unless the sweep changes them).", ""]
    for sweep, data in results["sweeps"].items():
        lines += [f"**{sweep}** ({data['axis']})", "",
                  "| x | norms ‖dW_k‖ | NAN p=1 c | NAN p=2 c | n_k/sum n | gap NAN p=1 | gap NAN p=2 | gap data volume | gap best c |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for case in data["cases"]:
            fmt = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
            lines.append(
                f"| {_x(sweep, case):g} | {fmt(case['norms'])} | {fmt(case['NAN p=1']['coefficients'])} | "
                f"{fmt(case['NAN p=2']['coefficients'])} | {fmt(case['data volume']['coefficients'])} | "
                + " | ".join(f"{case[m]['gap_vs_uniform']:.3f}" for m in ("NAN p=1", "NAN p=2", "data volume", "best coefficients"))
                + " |")
        lines.append("")
    return "\n".join(lines)


def theory_plots(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = results["sweeps"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    styles = {"uniform": ("k", "--"), "NAN p=1": ("C0", "-"), "NAN p=2": ("C1", "-"),
              "data volume": ("C2", ":"), "best coefficients": ("C3", ":")}
    for ax, (sweep, data) in zip(axes.flat, sweeps.items()):
        xs = [_x(sweep, c) for c in data["cases"]]
        for name in THEORY_MERGES:
            ys = [c[name]["gap_vs_uniform"] for c in data["cases"]]
            color, line = styles[name]
            ax.plot(xs, ys, marker="o", ms=3, color=color, ls=line, label=name)
        ax.set_yscale("log")
        ax.set_ylim(5e-4, max(2.0, max(c["NAN p=2"]["gap_vs_uniform"] for c in data["cases"]) * 1.3))
        if sweep in ("volume ratio", "dimension"):
            ax.set_xscale("log", base=2)
        ax.set_title(sweep)
        ax.set_xlabel(data["axis"], fontsize=8)
        ax.set_ylabel("gap to optimum / uniform's gap")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Experiment 1: least squares, 3 tasks - merged loss above the optimum, relative to uniform (lower is better)")
    fig.tight_layout()
    paths = [folder / "results-theory.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for sweep, index, label in (("shared shift", 0, "zero mean"), ("shared shift", 3, "shared shift = 1 x noise"),
                                ("shared shift", 5, "shared shift = 4 x noise"), ("dimension", 0, "zero mean, d = 4"),
                                ("task-specific shifts", 3, "task-specific shifts = 1 x noise, largest on the largest task")):
        case = sweeps[sweep]["cases"][min(index, len(sweeps[sweep]["cases"]) - 1)]
        ps = sorted(case["exponents"], key=float)
        ax.plot([float(p) for p in ps], [case["exponents"][p]["gap_vs_uniform"] for p in ps], marker="o", label=label)
    ax.set_xlabel("exponent p in c_k ~ ||dW_k||^-p (0 = uniform)")
    ax.set_ylabel("gap to optimum / uniform's gap")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Experiment 1: which exponent (n_k = 64, 256, 1024; d = 32 unless said)")
    fig.tight_layout()
    paths.append(folder / "results-theory-exponent.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- experiment 2


def _by_name(rows: list[dict]) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for row in rows:
        out[row["name"]].append(row)
    return out


def _std(values) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _ms(values) -> str:
    values = np.asarray(values, dtype=float) * 100
    return f"{values.mean():.1f} ± {_std(values):.1f}"


METRICS = (("balanced", "mean_balanced", "Balanced accuracy (mean of the per-class recalls; a constant prediction scores "
             "1 / classes)"), ("accuracy", "mean", "Accuracy"))


def _partner(name: str) -> str:
    """The uniform-coefficient row a NAN row is paired with."""
    return name.replace("/nan/p2/", "/uniform/").replace("/nan/module/", "/uniform/").replace("/nan/", "/uniform/")


def _baseline_rows(results: dict, tasks: list[str]) -> dict:
    """{metric: {task: value}} of the constant majority-class prediction on each test set."""
    base = results.get("test_baselines") or {}
    if not base:
        return {}
    return {"accuracy": {t: base[t]["majority"] for t in tasks}, "balanced": {t: base[t]["balanced_of_constant"] for t in tasks}}


def lora_tables(results: dict) -> str:
    rows = results["rows"]
    tasks = list(rows[0]["accuracy"])
    seeds = sorted({r["seed"] for r in rows})
    named = _by_name(rows)
    setup = results["setup"]
    constant = _baseline_rows(results, tasks)
    lines = [f"Mean ± std over seeds {', '.join(map(str, seeds))} (the spread across seeds is the only uncertainty shown); "
             f"test sets of {setup['test_size']} per task, duplicates removed before splitting. Training examples: "
             + ", ".join(f"{t} {n}" for t, n in setup["train_sizes"].items()) + "."]
    base = results.get("test_baselines") or {}
    if base:
        lines += ["", "| task | test examples per class | majority class (constant prediction) accuracy | its balanced accuracy |",
                  "|---|---|---|---|"]
        lines += [f"| {t} | {' / '.join(map(str, base[t]['counts']))} | {100 * base[t]['majority']:.1f} | "
                  f"{100 * base[t]['balanced_of_constant']:.1f} |" for t in tasks]
    for metric, mean_key, title in METRICS:
        if metric not in rows[0]:
            continue
        lines += ["", f"**{title}, %.**", "",
                  "| model | " + " | ".join(tasks) + " | mean | Δ mean vs uniform (paired) |", "|---" * (len(tasks) + 3) + "|"]
        if constant:
            values = constant[metric]
            lines.append("| majority class of the test set (constant) | " + " | ".join(f"{100 * values[t]:.1f}" for t in tasks)
                         + f" | {100 * np.mean(list(values.values())):.1f} |  |")
        for name, group in named.items():
            partner = _partner(name)
            delta = ""
            if partner != name and partner in named:
                paired = {r["seed"]: r[mean_key] for r in named[partner]}
                delta = _ms([r[mean_key] - paired[r["seed"]] for r in group])
            lines.append(f"| {name} | " + " | ".join(_ms([r[metric][t] for r in group]) for t in tasks)
                         + f" | {_ms([r[mean_key] for r in group])} | {delta} |")
        nan_rows = [n for n in named if _partner(n) != n and _partner(n) in named]
        lines += ["", f"NAN − uniform, paired per seed, in points of {metric.replace('balanced', 'balanced accuracy')}: "
                  "per task (mean ± std over seeds) and per seed (mean over tasks).", "",
                  "| model | " + " | ".join(tasks) + " | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (len(tasks) + len(seeds) + 1) + "|"]
        for name in nan_rows:
            paired = {r["seed"]: r for r in named[_partner(name)]}
            per_task = [_ms([r[metric][t] - paired[r["seed"]][metric][t] for r in named[name]]) for t in tasks]
            per_seed = {r["seed"]: 100 * (r[mean_key] - paired[r["seed"]][mean_key]) for r in named[name]}
            lines.append(f"| {name} | " + " | ".join(per_task) + " | "
                         + " | ".join(f"{per_seed[s]:+.1f}" if s in per_seed else "" for s in seeds) + " |")
    lines += ["", "Update norms ‖dW_k‖_F and NAN coefficients (p = 1, granularity adapter, total 1), mean over seeds:", "",
              "| task | training examples | epochs | norm | NAN c (p=1) | NAN c (p=2) |", "|---|---|---|---|---|---|"]
    nan1, nan2 = named["task_arithmetic/nan/total1"], named["task_arithmetic/nan/p2/total1"]
    for t in tasks:
        logs = [entry for entry in results["training"] if entry["task"] == t]
        lines.append(f"| {t} | {setup['train_sizes'][t]} | {np.mean([e['epochs'] for e in logs]):.1f} | "
                     f"{np.mean([r['norms'][t] for r in nan1]):.3f} ± {_std([r['norms'][t] for r in nan1]):.3f} | "
                     f"{np.mean([r['coefficients'][t] for r in nan1]):.3f} | {np.mean([r['coefficients'][t] for r in nan2]):.3f} |")
    return "\n".join(lines)


def lora_plots(results: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    tasks = list(rows[0]["accuracy"])
    named = _by_name(rows)
    paths = []
    metric_key, mean_key = ("balanced", "mean_balanced") if "balanced" in rows[0] else ("accuracy", "mean")
    metric_label = "balanced accuracy" if metric_key == "balanced" else "accuracy"
    constant = _baseline_rows(results, tasks).get(metric_key)

    def value(r: dict, metric: str) -> float:
        return 100 * (r[mean_key] if metric == "mean" else r[metric_key][metric])

    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.8), sharex=True)
    variants = (("uniform", "uniform", "k"), ("nan", "NAN p=1", "C0"), ("nan/p2", "NAN p=2", "C1"), ("nan/module", "NAN p=1, per module", "C2"))
    totals = sorted({r["spec"]["total"] for r in rows if r["kind"] == "merge" and r["spec"]["method"] == "task_arithmetic"})
    for ax, metric in zip(axes, [*tasks, "mean"]):
        for key, label, color in variants:
            ys, es = [], []
            for total in totals:
                group = named.get(f"task_arithmetic/{key}/total{total:g}", [])
                values = [value(r, metric) for r in group]
                ys.append(np.mean(values))
                es.append(_std(values))
            ax.errorbar(totals, ys, yerr=es, marker="o", ms=3, capsize=2, color=color, label=label)
        for ref, style in (("base encoder + task heads", ":"), ("linear probe (no adapter)", "-.")):
            values = [value(r, metric) for r in named[ref]]
            ax.axhline(np.mean(values), color="gray", ls=style, label=ref)
        if metric != "mean":
            values = [value(r, metric) for r in named[f"adapter {metric} alone"]]
            ax.axhline(np.mean(values), color="gray", ls="--", label="its adapter alone")
        if constant:
            level = np.mean(list(constant.values())) if metric == "mean" else constant[metric]
            ax.axhline(100 * level, color="C3", ls=(0, (1, 3)), label="constant prediction (majority class)")
        ax.set_title(metric if metric == "mean" else f"{metric} ({results['setup']['train_sizes'][metric]} examples)")
        ax.set_xlabel("total (sum of coefficients)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric_label} %")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Experiment 2: task arithmetic on MiniLM LoRA adapters, uniform vs NAN coefficients ({metric_label}, mean ± std over seeds)")
    fig.tight_layout()
    paths.append(folder / "results-lora-total.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rules = [("task_arithmetic", "total1", "TA, total 1"), ("task_arithmetic", f"total{totals[-1]:g}", f"TA, total {totals[-1]:g}"),
             ("ties", "total1", "TIES"), ("dare_linear", f"total{totals[-1]:g}", "DARE")]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.38
    for i, (rule, total, label) in enumerate(rules):
        for j, (coef, color) in enumerate((("uniform", "0.6"), ("nan", "C0"))):
            group = named.get(f"{rule}/{coef}/{total}", [])
            values = [100 * r[mean_key] for r in group]
            ax.bar(i + (j - 0.5) * width, np.mean(values), width, yerr=_std(values),
                   color=color, capsize=3, label=("uniform" if coef == "uniform" else "NAN") if i == 0 else None)
            ax.scatter([i + (j - 0.5) * width] * len(values), values, s=10, color="k", zorder=3,
                       label="one seed" if i == 0 and j == 0 else None)
    for ref, style in (("base encoder + task heads", ":"), ("linear probe (no adapter)", "-.")):
        ax.axhline(np.mean([100 * r[mean_key] for r in named[ref]]), color="gray", ls=style, label=ref)
    ax.set_xticks(range(len(rules)), [name for *_, name in rules])
    ax.set_ylabel(f"mean {metric_label} over tasks %")
    low = min(100 * r[mean_key] for r in rows if r["kind"] == "merge")
    ax.set_ylim(max(0, low - 10), None)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Experiment 2: each merge rule with uniform vs NAN coefficients ({metric_label})")
    fig.tight_layout()
    paths.append(folder / "results-lora-rules.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def volume_tables(results: dict) -> str:
    rows = results.get("volume_rows") or []
    if not rows:
        return ""
    setup = results["setup"]
    task, sizes = setup["volume_task"], [str(n) for n in setup["volume_sizes"]]
    named = _by_name(rows)
    lines = [f"One task ({task}), three adapters trained on disjoint samples of {', '.join(sizes)} examples through one "
             f"frozen, randomly initialised shared head (so the adapters learn all of the task), the same recipe ({setup['steps']} steps of "
             f"{setup['batch']}). Accuracy and balanced accuracy on the {setup['test_size']} test examples, mean ± std over "
             "seeds; Δ: paired difference to the same rule with uniform coefficients.", ""]
    base = (results.get("test_baselines") or {}).get(task)
    if base:
        lines += [f"Test set per class: {' / '.join(map(str, base['counts']))}; the majority class alone scores "
                  f"{100 * base['majority']:.1f}% accuracy, {100 * base['balanced_of_constant']:.1f}% balanced accuracy.", ""]
    keys = [("mean", "accuracy")] + ([("mean_balanced", "balanced accuracy")] if "mean_balanced" in rows[0] else [])
    lines += ["| model | " + " | ".join(f"{label} % | Δ {label} vs uniform" for _, label in keys) + " | coefficients "
              + " / ".join(sizes) + " |", "|---" * (2 * len(keys) + 2) + "|"]
    for name, group in named.items():
        partner = "ties/uniform/total1" if name.startswith("ties/") else "task_arithmetic/uniform/total1"
        cells = []
        for key, _ in keys:
            paired = {r["seed"]: r[key] for r in named.get(partner, [])}
            delta = _ms([r[key] - paired[r["seed"]] for r in group]) if "/" in name and "uniform" not in name and paired else ""
            cells += [_ms([r[key] for r in group]), delta]
        coefficients = " / ".join(f"{np.mean([r['coefficients'][n] for r in group]):.2f}" for n in sizes) if group[0].get("coefficients") else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {coefficients} |")
    lines += ["", f"Update norms ‖dW‖ of the {', '.join(sizes)}-example adapters (mean over seeds): "
              + " / ".join(f"{np.mean([r['norms'][n] for r in named['task_arithmetic/uniform/total1']]):.2f} ± "
                           f"{_std([r['norms'][n] for r in named['task_arithmetic/uniform/total1']]):.2f}" for n in sizes) + "."]
    return "\n".join(lines)


def volume_plot(results: dict, folder: Path) -> list[Path]:
    rows = results.get("volume_rows") or []
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    sizes = [str(n) for n in setup["volume_sizes"]]
    named = _by_name(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 2.2]})
    ref = named["task_arithmetic/uniform/total1"]
    left.errorbar([int(n) for n in sizes], [np.mean([r["norms"][n] for r in ref]) for n in sizes],
                  yerr=[_std([r["norms"][n] for r in ref]) for n in sizes], marker="o", capsize=3, label=f"{setup['volume_task']}, same recipe")
    multi = results["rows"]
    tasks = list(multi[0]["accuracy"])
    for t in tasks:
        group = [r for r in multi if r["name"] == f"adapter {t} alone"]
        left.errorbar([setup["train_sizes"][t]], [np.mean([r["norms"][t] for r in group])], yerr=[_std([r["norms"][t] for r in group])],
                      marker="s", capsize=3, ls="none", label=f"multi-task adapter: {t}")
    left.set_xscale("log", base=2)
    left.set_xlabel("training examples")
    left.set_ylabel("||dW||_F of the adapter")
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    left.set_title("update norm vs data volume")
    names = [n for n in named if "/" in n]
    key = "mean_balanced" if "mean_balanced" in rows[0] else "mean"
    values = [[100 * r[key] for r in named[n]] for n in names]
    right.bar(range(len(names)), [np.mean(v) for v in values], yerr=[_std(v) for v in values], capsize=3,
              color=["0.6" if "uniform" in n else "C2" if "volume" in n else "C0" for n in names])
    for n, style in zip((f"adapter {n} alone" for n in sizes), (":", "-.", "--")):
        right.axhline(np.mean([100 * r[key] for r in named[n]]), ls=style, color="gray", label=n)
    right.set_xticks(range(len(names)), [n.replace("task_arithmetic/", "TA/").replace("/total1", "") for n in names], rotation=20, fontsize=8)
    low = min(min(v) for v in values)
    right.set_ylim(low - 3, 100)
    right.set_ylabel("balanced accuracy %" if key == "mean_balanced" else "accuracy %")
    right.legend(fontsize=7)
    right.grid(alpha=0.3, axis="y")
    right.set_title(f"merging same-task adapters ({' / '.join(sizes)} examples)")
    fig.tight_layout()
    path = folder / "results-lora-volume.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

