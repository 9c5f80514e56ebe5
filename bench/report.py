"""Ratios, targets and the Markdown table from the raw measurements of bench.run.

The JSON result holds, per section, a list of cases; each case has
  case      what was measured (label)
  params    the parameters it ran with
  times     {contender: {"median": s, "times": [s, ...]}} timed side by side in one process
  processes {command: {"median": s, "times": [...], "peak": bytes}} whole processes (cli, fold)
  peaks     {contender: bytes} peak memory above the resident size before the call, one fresh process each
  gpu_peaks {contender: bytes} on a GPU (cases on cuda): peak GPU memory above that allocated before the call
  ratios    {name: value} derived here (see derive)
  check     {name: value} how far the contenders' results are from each other
  info      sizes, flops and counts of the inputs
and "targets" lists {section, case, target, value, limit, met, margin} for the issue's targets.
"""

from __future__ import annotations

from collections.abc import Mapping

MiB = 2**20


def _find(mapping: Mapping, prefix: str, before: bool = False, exact: bool = False):
    """The entry whose name starts with `prefix` (is `prefix`, if exact) and ends with " (before)" iff before."""
    for name, value in (mapping or {}).items():
        if (name == prefix if exact else name.startswith(prefix)) and name.endswith(" (before)") == before:
            return value
    return None


def _median(times: Mapping, prefix: str, before: bool = False, exact: bool = False) -> float | None:
    found = _find(times, prefix, before, exact)
    return None if found is None else found["median"]


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def derive(section: str, entry: dict) -> dict:
    """Add entry["ratios"]: the figures the table reports, each a ratio of numbers measured side by side."""
    times, info = entry.get("times", {}), entry.get("info", {})
    peaks = entry.get("gpu_peaks") or entry.get("peaks", {})  # on a GPU its memory is the one that binds
    ratios: dict[str, float | None] = {}
    if section == "norms":
        gram = _median(times, "nan-peft update_gram")
        floor = min(v["median"] for k, v in times.items() if k.startswith("read floor"))  # the faster way to read
        probe = _median(times, "float64 GEMM rate probe")
        rate = info["probe_flops"] / probe if probe else None
        ratios["update_gram / read floor"] = _ratio(gram, floor)
        ratios["update_gram / float64 compute floor"] = _ratio(gram, info["gram_flops"] / rate) if rate else None
        ratios["dense / update_gram (same layers)"] = _ratio(_median(times, "dense B@A"), _median(times, "nan-peft update_gram,"))
        ratios["before / now"] = _ratio(_median(times, "nan-peft update_gram", before=True), gram)
        ratios["read floor GB/s"] = _ratio(info["bytes"] / 1e9, floor)
        ratios["update_gram GFLOP/s"] = _ratio(info["gram_flops"] / 1e9, gram)
        ratios["float64 GEMM GFLOP/s"] = rate / 1e9 if rate else None
    elif section in ("svd", "cat"):
        ours, peft = _median(times, "nan-peft merge_adapters"), _median(times, "peft add_weighted_adapter")
        ratios["peft / nan-peft time"] = _ratio(peft, ours)
        ratios["peft / nan-peft combine-only time"] = _ratio(peft, _median(times, "nan-peft combine only"))
        ratios["nan-peft / peft peak memory"] = _ratio(_find(peaks, "nan-peft merge_adapters"), _find(peaks, "peft add_weighted_adapter"))
        ratios["before / now"] = _ratio(_median(times, "nan-peft merge_adapters", before=True), ours)
        ratios["per module, nan-peft ms"] = ours * 1e3 / info["modules"] if ours else None
        ratios["per module, peft ms"] = peft * 1e3 / info["modules"] if peft else None
    elif section == "cli":
        processes = entry.get("processes", {})
        for kind in ("cat", "svd"):
            prefix = "nan-peft merge (cat" if kind == "cat" else "nan-peft merge --combine svd"
            now, old = _find(processes, prefix), _find(processes, prefix, before=True)
            ratios[f"{kind}: before / now"] = _ratio(old and old["median"], now and now["median"])
        startup = _find(processes, "nan-peft --version")
        cat = _find(processes, "nan-peft merge (cat")
        ratios["cat: seconds after startup"] = cat["median"] - startup["median"] if cat and startup else None
    elif section == "many":
        probe = _median(times, "float64 GEMM rate probe")
        rate = info["probe_flops"] / probe if probe else None
        svd, norms = _median(times, "nan-peft combine svd"), _median(times, "nan-peft update_gram")
        floor = _median(times, "read floor")
        ratios["norms s"], ratios["cat s"], ratios["svd s"] = norms, _median(times, "nan-peft combine cat"), svd
        ratios["peft svd s (1 module)"] = _median(times, "peft add_weighted_adapter")
        ratios["peft / nan-peft svd time, per module"] = _ratio(ratios["peft svd s (1 module)"], svd / info["modules"] if svd else None)
        ratios["norms / read floor"] = _ratio(norms, floor)
        ratios["norms / float64 compute floor"] = _ratio(norms, info["gram_flops"] / rate) if rate else None
        ratios["svd / read floor"] = _ratio(svd, floor)
        ratios["svd / float64 compute floor (randomized flops)"] = _ratio(svd, info["randomized_flops"] / rate) if rate else None
        ratios["svd peak MiB"] = (_find(peaks, "nan-peft combine svd") or 0) / MiB or None
        ratios["merge s (norms + svd)"] = norms + svd if norms and svd else None
        ratios["merge s (merge_sources, one pass)"] = _median(times, "nan-peft merge_sources")
        ratios["merge peak MiB (merge_sources)"] = (_find(peaks, "nan-peft merge_sources") or 0) / MiB or None
        ratios["svd s, whole model (x 32 layers)"] = svd * 32 if svd else None
        ratios["svd peak MiB, whole model (+ 31 layers of output)"] = (
            ratios["svd peak MiB"] + 31 * info["output_bytes_per_layer_svd"] / MiB if ratios["svd peak MiB"] else None)
    elif section == "spectral" and entry.get("processes"):
        processes = entry["processes"]
        svd = _find(processes, "nan-peft merge --combine svd")
        for name, value in processes.items():
            if "--method" in name:
                ratios[f"{name.split('--method ')[1]} / svd CLI time"] = _ratio(value["median"], svd and svd["median"])
    elif section == "spectral":
        core, dense = _median(times, "nan-peft"), _median(times, f"{info['rule']} on the dense")
        ratios["dense / core time"] = _ratio(dense, core)
        ratios["dense / core peak memory"] = _ratio(_find(peaks, f"{info['rule']} on the dense"), _find(peaks, "nan-peft"))
    elif section == "extract":
        named = {word: next((v["median"] for k, v in times.items() if k.startswith(word)), None)
                 for word in ("read floor", "mergekit-extract-lora", "nan-peft extract")}
        exact = next((v["median"] for k, v in times.items() if k.startswith("nan-peft extract") and "exact" in k), None)
        ours, theirs = named["nan-peft extract"], named["mergekit-extract-lora"]  # ours: the first, auto (randomized)
        ratios["mergekit / nan-peft time"] = _ratio(theirs, ours)
        ratios["mergekit / nan-peft exact (float64) time"] = _ratio(theirs, exact)
        ratios["mergekit / nan-peft peak memory"] = _ratio(_find(peaks, "mergekit-extract-lora"), _find(peaks, "nan-peft extract"))
        ratios["nan-peft / read floor"] = _ratio(ours, named["read floor"])
        ratios["per module, nan-peft ms"] = ours * 1e3 / info["modules"] if ours else None
    elif section == "full":
        processes = entry.get("processes", {})
        ours, nan, theirs = _find(processes, "nan-peft merge --base (task"), _find(processes, "nan-peft merge --base (NAN"), _find(processes, "mergekit")
        ratios["mergekit / nan-peft time"] = _ratio(theirs and theirs["median"], ours and ours["median"])
        ratios["mergekit / nan-peft peak memory"] = _ratio(theirs and theirs["peak"], ours and ours["peak"])
        ratios["NAN (two passes) / weights (one pass) time"] = _ratio(nan and nan["median"], ours and ours["median"])
        ratios["nan-peft peak / model size"] = _ratio(ours and ours["peak"], info.get("model_bytes"))
    elif section == "fold":
        fold = _median(times, "nan-peft fold_into, 3 adapters")
        size = info["model_bytes"]
        ratios["fold (3 adapters) / safetensors copy"] = _ratio(fold, _median(times, "safetensors load + save copy", exact=True))
        ratios["fold (3 adapters) / safetensors copy, fsynced"] = _ratio(fold, _median(times, "safetensors load + save copy, fsynced"))
        ratios["fold (3 adapters) / file copy"] = _ratio(fold, _median(times, "file copy"))
        ratios["fold (1 adapter) / safetensors copy"] = _ratio(_median(times, "nan-peft fold_into, 1 adapter"), _median(times, "safetensors load + save copy", exact=True))
        ratios["fold GB/s"] = _ratio(size / 1e9, fold)
        probe = _median(times, "float32 GEMM rate probe")
        compute = info["fold_flops"] / (info["probe_flops"] / probe) if probe else None
        ratios["update arithmetic alone (float32 GEMM floor) / safetensors copy"] = _ratio(compute, _median(times, "safetensors load + save copy", exact=True))
        ratios["fold peak / model size"] = _ratio(_find(entry.get("peaks", {}), "nan-peft fold_into, 3 adapters"), size)
        if entry.get("gpu_peaks"):
            ratios["fold GPU peak / model size"] = _ratio(_find(entry["gpu_peaks"], "nan-peft fold_into, 3 adapters"), size)
        ratios["before / now"] = _ratio(_median(times, "nan-peft fold_into, 3 adapters", before=True), fold)
        processes = entry.get("processes", {})
        ours, theirs = _find(processes, "nan-peft merge --fold-into"), _find(processes, "mergekit")
        ratios["mergekit / nan-peft time (CLI, 1 adapter)"] = _ratio(theirs and theirs["median"], ours and ours["median"])
        ratios["mergekit / nan-peft peak (CLI, 1 adapter)"] = _ratio(theirs and theirs["peak"], ours and ours["peak"])
        ratios["nan-peft CLI fold whole-process peak / model size"] = _ratio(ours and ours["peak"], size)
    entry["ratios"] = ratios
    return entry


def targets(results: Mapping) -> list[dict]:
    """The issue's targets, each measured value against its limit; margin = how far from the limit (x)."""
    out = []

    def add(section, case, target, value, limit, at_most: bool):
        if value is None:
            return
        met = value <= limit if at_most else value >= limit
        margin = value / limit if at_most else limit / value
        out.append({"section": section, "case": case, "target": target, "value": value, "limit": limit, "met": met, "margin": margin})

    sections = results.get("sections", {})
    for entry in sections.get("norms", []):
        if entry["params"].get("shape") == "llama-7b":
            add("norms", entry["case"], "update_gram within 2x of the read floor", entry["ratios"]["update_gram / read floor"], 2.0, True)
            add("norms", entry["case"], "update_gram within 2x of its float64 compute floor (the binding limit here)",
                entry["ratios"]["update_gram / float64 compute floor"], 2.0, True)
    for entry in sections.get("svd", []):
        if entry["params"].get("shape") == "llama-7b":
            add("svd", entry["case"], "svd merge >= 100x faster than peft's", entry["ratios"]["peft / nan-peft time"], 100.0, False)
            add("svd", entry["case"], "svd peak memory <= 1/10 of peft's", entry["ratios"]["nan-peft / peft peak memory"], 0.1, True)
    many = {entry["params"].get("count"): entry for entry in sections.get("many", [])
            if entry["params"].get("shape") == "llama-7b" and entry["params"].get("layers", 1) == 1}
    for entry in sections.get("many", []):
        if entry["params"].get("layers", 1) == 32 and entry["params"].get("count") == 64:
            add("many", entry["case"], "K=64 merge (merge_sources: norms + svd to rank 64) of the whole 7B model under 60 s",
                entry["ratios"]["merge s (merge_sources, one pass)"], 60.0, True)
            add("many", entry["case"], "K=64 svd merge of the whole 7B model: peak memory above the adapters under 2 GiB, MiB",
                entry["ratios"]["merge peak MiB (merge_sources)"], 2048.0, True)
    if 64 in many:
        entry = many[64]
        add("many", entry["case"], "K=64 svd merge to rank 64, whole 7B model (32 x this layer) under 60 s",
            entry["ratios"]["svd s, whole model (x 32 layers)"], 60.0, True)
        add("many", entry["case"], "K=64 svd merge peak memory under 2 GiB (whole model: + 31 layers of output), MiB",
            entry["ratios"]["svd peak MiB, whole model (+ 31 layers of output)"], 2048.0, True)
    if 16 in many and 256 in many:
        s16, s256 = many[16]["ratios"]["svd s"], many[256]["ratios"]["svd s"]
        add("many", "K=16 -> K=256", "svd time within 1.5x of linear in K from 16 to 256 (time ratio / 16)",
            s256 / s16 / 16 if s16 and s256 else None, 1.5, True)
    for count, entry in sorted(many.items()):
        worst = entry.get("check", {}).get("max |discarded - optimal discarded| / optimal (svd)")
        if "randomized" in entry["info"].get("truncation", []):
            add("many", entry["case"], "randomized truncation within 1e-3 relative of the optimal discarded norm", worst, 1e-3, True)
    for entry in sections.get("cli", []):
        cat = _find(entry.get("processes", {}), "nan-peft merge (cat")
        if cat and entry["params"].get("shape") == "llama-7b":
            add("cli", entry["case"], "7B-shaped 3-adapter CLI merge under 10 s", cat["median"], 10.0, True)
    for entry in sections.get("spectral", []):
        if entry.get("processes"):
            for key, value in entry["ratios"].items():
                add("spectral", entry["case"], f"CLI merge --method {key.split(' / ')[0]} within 2x of today's svd merge", value, 2.0, True)
        else:
            add("spectral", entry["case"], "core space >= 100x faster than the rule on dense updates", entry["ratios"]["dense / core time"], 100.0, False)
            add("spectral", entry["case"], "core space >= 10x less peak memory", entry["ratios"]["dense / core peak memory"], 10.0, False)
    for entry in sections.get("fold", []):
        add("fold", entry["case"], "fold within 1.5x of a plain (safetensors) copy", entry["ratios"]["fold (3 adapters) / safetensors copy"], 1.5, True)
        add("fold", entry["case"], "fold within 1.5x of a copy as durable as its output (fsynced)",
            entry["ratios"]["fold (3 adapters) / safetensors copy, fsynced"], 1.5, True)
    return out


def one_line(section: str, entry: Mapping) -> str:
    shown = {k: v for k, v in entry.get("ratios", {}).items() if v is not None}
    return ", ".join(f"{k} {_number(v)}" for k, v in list(shown.items())[:4]) or "done"


def _miss(margin: float) -> str:
    """How far past its limit a measured value is: a percentage below 2x, a factor above."""
    return f"{(margin - 1) * 100:.0f}%" if margin < 2 else f"{margin:.1f}x"


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}"


def _seconds(value) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.0f} MiB" if value >= MiB else f"{value / 1024:.0f} KiB"


TITLES = {
    "norms": "Norms: every <dW_i, dW_j> from r x r Grams (update_gram)",
    "svd": "Merge to rank r (svd): nan-peft vs peft add_weighted_adapter(combination_type=\"svd\")",
    "cat": "Exact merge (cat): nan-peft vs peft add_weighted_adapter(combination_type=\"cat\")",
    "cli": "Command line, end to end: read, norms, merge, write",
    "fold": "Fold into a base checkpoint (streaming), vs copying it and vs mergekit",
    "spectral": "Spectral rules: core space vs the same rule on dense updates; CLI against today's svd merge",
    "many": "Many adapters: a K sweep of norms, cat and svd (randomized truncation at large R) vs peft's dense svd",
    "extract": "Extract a LoRA from a full fine-tune: nan-peft extract vs mergekit-extract-lora and reading both checkpoints",
    "full": "Merge full fine-tuned checkpoints (task vectors, streamed): nan-peft merge --base vs mergekit-yaml",
}


def markdown(results: Mapping) -> str:
    machine, run = results["machine"], results["run"]
    memory = f", {machine['memory_bytes'] / 2**30:.0f} GiB RAM" if machine.get("memory_bytes") else ""
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines = [
        "# nan-peft benchmark",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores{memory}{gpu}; {machine['os']}; torch threads "
        f"{machine['torch_threads']}, OMP_WAIT_POLICY={machine.get('omp_wait_policy')}; {versions}.",
        f"Run: `{run['command']}` on {run['started']}, {run.get('seconds', 0):.0f} s; load average before "
        f"{run.get('load_average_before')}, after {run.get('load_average_after')} (a shared machine: compare ratios, not seconds).",
        "",
        "## Targets",
        "",
        "| target | case | measured | limit | met |",
        "|---|---|---:|---:|---|",
    ]
    for t in results.get("targets", []):
        verdict = "yes" if t["met"] else f"**no**, missed by {_miss(t['margin'])}"
        lines.append(f"| {t['target']} | {t['case']} | {_number(t['value'])} | {_number(t['limit'])} | {verdict} |")
    for section, entries in results.get("sections", {}).items():
        lines += ["", f"## {TITLES.get(section, section)}", ""]
        for entry in entries:
            lines += [f"**{entry['case']}**", ""]
            gpu = entry.get("gpu_peaks")
            rows = [(name, _seconds(v["median"]), _mib(entry.get("peaks", {}).get(name)), _mib(gpu.get(name)) if gpu else None)
                    for name, v in entry.get("times", {}).items()]
            rows += [(name, _seconds(v["median"]), _mib(v.get("peak")) + " (whole process)", "-" if gpu else None)
                     for name, v in entry.get("processes", {}).items()]
            if rows:
                lines += ["| contender | median time | peak memory |" + (" peak GPU memory |" if gpu else ""),
                          "|---|---:|---:|" + ("---:|" if gpu else "")]
                lines += [f"| {name} | {time} | {peak} |" + (f" {on_gpu} |" if gpu else "") for name, time, peak, on_gpu in rows]
                lines.append("")
            figures = {k: v for k, v in entry.get("ratios", {}).items() if v is not None}
            figures.update({k: v for k, v in entry.get("check", {}).items() if v is not None})
            figures.update({k: v for k, v in entry.get("notes", {}).items() if v is not None})
            if figures:
                lines.append("; ".join(f"{k}: {v if isinstance(v, str) else _number(v)}" for k, v in figures.items()) + ".")
                lines.append("")
    lines += ["", "Peak memory: above the resident size just before the call, each contender in a fresh process "
              "(VmHWM after a reset); \"whole process\": the command's own peak, interpreter and imports included.", ""]
    return "\n".join(lines)
