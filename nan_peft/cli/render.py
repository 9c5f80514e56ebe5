"""How the commands' documents (nan_peft.describe) read in a terminal: tables and lines of text."""

from __future__ import annotations

import json

import click


def g(value: float) -> str:
    return f"{value:.4g}"


def table(headers: list[str], rows: list[list], right: set[int] | None = None) -> str:
    right = right if right is not None else set(range(1, len(headers)))
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_json(document) -> None:
    click.echo(json.dumps(document, indent=2))


def merge_text(document: dict, output: str) -> str:
    rows = [[a["name"], a["path"], g(a["norm"]), "per module" if a["coefficient"] is None else g(a["coefficient"])] for a in document["adapters"]]
    c = document["coefficients"]
    rule = ", ".join(f"{key} {value}" for key, value in document["rule"].items())
    lines = [
        table(["adapter", "path", "norm", "coefficient"], rows, right={2, 3}),
        f"\n{c['method']} coefficients ({c['granularity']}"
        + (f", exponent {g(c['exponent'])}" if c["exponent"] is not None else "")
        + (f", total {g(c['total'])}" if c["total"] is not None else "")
        + f"), {document['method']} rule" + (f" ({rule})" if rule else "")
        + f"; {document['combine']} merge of {len(document['modules'])} modules, rank {document['rank']}",
    ]
    if document["combine"] == "svd" and document["modules"]:
        worst = max(document["modules"], key=lambda m: m["relative_discarded"])
        lines.append(f"largest relative truncation error: {g(worst['relative_discarded'])} ({worst['module']})")
    if document["fold_into"]:
        lines.append(f"folded the exact merge (no truncation) into {document['fold_into']}: wrote the full model {output}")
    else:
        lines.append(f"wrote {output} ({', '.join(document['files'])})")
    return "\n".join(lines)


def norms_text(document: dict) -> str:
    names = [a["name"] for a in document["adapters"]]
    headers, columns = ["adapter", "ranks", "modules", "norm"], []
    for entry in document["options"]:
        label = {"nan": "NAN", "uniform": "uniform"}[entry["coefficients"]]
        if entry["coefficients"] == "nan":
            label += f" p={g(entry['exponent'])}" + (" per module" if entry["granularity"] == "module" else "")
        headers.append(label)
        columns.append(entry)
    rows = []
    for a in document["adapters"]:
        row = [a["name"], ",".join(map(str, a["ranks"])), a["modules"], g(a["norm"])]
        for entry in columns:
            if entry["error"]:
                row.append("-")
            elif entry["per_adapter"] is not None:
                row.append(g(entry["per_adapter"][a["name"]]))
            else:
                low, high = entry["per_module_range"][a["name"]]
                row.append(g(low) if g(low) == g(high) else f"{g(low)}..{g(high)}")
        rows.append(row)
    lines = [
        table(headers, rows),
        "\ncosine similarity of the updates",
        table(["", *names], [[name, *(f"{v:.3f}" for v in row)] for name, row in zip(names, document["cosine_similarity"])]),
        "\n||sum_k c_k dW_k||_F: " + ", ".join(f"{h} {g(e['merged_norm'])}" for h, e in zip(headers[4:], columns) if e["merged_norm"] is not None),
    ]
    lines += [f"{header}: {entry['error']}" for header, entry in zip(headers[4:], columns) if entry["error"]]
    return "\n".join(lines)


def adapter_text(d: dict) -> str:
    scaling = ", ".join(g(s) for s in d["scaling"]["values"])
    lines = [
        f"adapter      {d['path']}",
        f"base model   {d['base_model'] or '(not recorded)'}" + (f"  task {d['task_type']}" if d["task_type"] else ""),
        f"rank         {', '.join(map(str, d['ranks']))}  (config r={d['r']}, lora_alpha={g(d['lora_alpha'])})",
        f"scaling      {d['scaling']['rule']} = {scaling}",
        f"targets      {', '.join(d['target_modules'])}  ({d['modules']} modules" + (f", layers {ranges(d['layers'])})" if d["layers"] else ")"),
        f"size         {d['parameters']:,} parameters, {d['size_bytes']:,} bytes ({d['format']}, {', '.join(d['dtypes'])})",
        f"variants     {', '.join(d['variants']) or 'plain LoRA'}",
        "",
        "serving",
    ]
    for engine, verdict in d["serving"].items():
        lines.append(f"  {engine:<8} {'loads as is' if verdict['loads'] else 'does NOT load as is'}")
        lines += [f"           {f['level']}: {f['message']}" for f in verdict["findings"]]
    return "\n".join(lines)


def ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(spans)
