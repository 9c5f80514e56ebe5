"""What adapters are, as plain data: the documents `nan-peft norms` and `nan-peft inspect` print (their keys are
the JSON interface documented in nan_peft.cli). No I/O beyond listing an adapter's folder; no rendering."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .coefficients import coefficients_for
from .errors import NanPeftError
from .lora import LoraAdapter
from .merge import MergeResult
from .norms import UpdateGram
from .peft_format import SAFETENSORS_NAME
from .record import module_entry
from .serving import ENGINES, layer_index, loads, module_type, serving_findings

# The coefficient options `norms` compares: (provider, granularity, exponent).
NORMS_OPTIONS = (("nan", "adapter", 1.0), ("nan", "adapter", 2.0), ("nan", "module", 1.0), ("uniform", "adapter", None))


def norms_document(sources: Sequence[LoraAdapter], paths: Sequence[str], gram: UpdateGram) -> dict:
    """Each adapter's update norm, the cosine similarities of the updates, and the coefficients of each of
    NORMS_OPTIONS (or why it is impossible here), with the merged update's norm under them."""
    names = list(gram.adapter_names)
    options = []
    for method, granularity, exponent in NORMS_OPTIONS:
        entry = {"coefficients": method, "granularity": granularity, "exponent": exponent, "total": 1.0,
                 "per_adapter": None, "per_module_range": None, "merged_norm": None, "error": None}
        try:
            coeffs = coefficients_for(method, gram, granularity=granularity, exponent=exponent)
        except NanPeftError as error:
            entry["error"] = str(error)
            options.append(entry)
            continue
        if coeffs.per_adapter is not None:
            entry["per_adapter"] = dict(zip(names, coeffs.per_adapter.tolist()))
        values, present = coeffs.values, gram.present
        entry["per_module_range"] = {
            name: [values[present[:, k], k].min().item(), values[present[:, k], k].max().item()] for k, name in enumerate(names)
        }
        entry["merged_norm"] = gram.merged_norms(values).square().sum().sqrt().item()
        options.append(entry)
    module_norms = gram.module_norms.tolist()
    present = gram.present.tolist()
    return {
        "adapters": [
            {"name": a.name, "path": path, "ranks": sorted(a.ranks), "modules": len(a.modules), "norm": n}
            for a, path, n in zip(sources, paths, gram.adapter_norms.tolist())
        ],
        "cosine_similarity": gram.cosine_similarity().tolist(),
        "options": options,
        "modules": [
            {"module": module, "norms": {n: v for n, v, here in zip(names, row, here_row) if here}}
            for module, row, here_row in zip(gram.modules, module_norms, present)
        ],
    }


def adapter_document(source: LoraAdapter, path: str, tensor_parallel: int = 1, engine_version: str | None = None) -> dict:
    """What one adapter is (base model, ranks, scaling, targets, layers, size, variants) and what each serving
    engine finds in it (serving.serving_findings)."""
    config = source.config
    folder = Path(source.source)
    files = {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}
    kinds: dict[str, int] = {}
    for module in source.modules.values():
        kinds[module.kind] = kinds.get(module.kind, 0) + 1
    findings = serving_findings(source, tensor_parallel, engine_version, where=path, files=files)
    return {
        "name": source.name,
        "path": path,
        "base_model": source.base_model,
        "task_type": config.get("task_type"),
        "format": "safetensors" if SAFETENSORS_NAME in files else "bin",
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "ranks": sorted(source.ranks),
        "scaling": {"rule": "lora_alpha/sqrt(r) (rsLoRA)" if config.get("use_rslora") else "lora_alpha/r",
                    "values": sorted({m.scale for m in source.modules.values()})},
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": sorted({module_type(p) for p in source.modules}),
        "modules": len(source.modules),
        "layers": sorted({i for i in map(layer_index, source.modules) if i is not None}),
        "kinds": kinds,
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for m in source.modules.values() for t in (m.A, m.B)}),
        "parameters": source.num_parameters,
        "size_bytes": sum(size for name, size in files.items() if name.startswith("adapter_")),
        "variants": variants(source, kinds),
        "serving": {engine: {"loads": loads(findings[engine]), "findings": [f.as_dict() for f in findings[engine]]} for engine in ENGINES},
    }


def variants(adapter: LoraAdapter, kinds: dict) -> list[str]:
    """The LoRA variants and extras an adapter uses, in words."""
    config = adapter.config
    checks = [
        (config.get("use_rslora"), "rsLoRA"),
        (config.get("rank_pattern"), "rank_pattern"),
        (config.get("alpha_pattern"), "alpha_pattern"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out (Conv1D)"),
        (config.get("layers_to_transform") is not None, "layers_to_transform"),
        ("embedding" in kinds, "embedding LoRA"),
        ("conv" in kinds, "convolution LoRA"),
        (adapter.extras, "carries full embedding weights"),
        (adapter.saved, f"carries full modules (modules_to_save: {', '.join(adapter.saved_modules)})"),
        (isinstance(config.get("init_lora_weights"), str), f"init_lora_weights={config.get('init_lora_weights')!r}"),
    ]
    return [name for present, name in checks if present]


def merge_document(result: MergeResult, record: Mapping, output: str, files: list[str]) -> dict:
    """What a merge made, as `nan-peft merge --json` prints it: the output, the rule and coefficients with their
    options as used (MergeSpec's effective options), each adapter's norm and coefficient, each module's report."""
    spec = result.spec
    coefficients = result.coefficients
    per_adapter = record["coefficients"]["per_adapter"]
    names = list(result.gram.adapter_names)
    by_module = dict(zip(coefficients.modules, coefficients.values.tolist()))
    present = dict(zip(result.gram.modules, result.gram.present.tolist()))
    modules = []
    for report in result.report:
        entry = module_entry(report)
        entry["coefficients"] = {n: c for n, c, here in zip(names, by_module[report.module], present[report.module]) if here}
        modules.append(entry)
    options = record["options"]
    return {
        "output": output,
        "files": files,
        "rank": record["rank"],
        "combine": spec.combine,
        "dtype": options["dtype"],
        "device": options["device"],
        "method": spec.method,
        "rule": spec.effective_rule_options(),
        **({"scale_chosen": options["scale_chosen"]} if "scale_chosen" in options else {}),  # --scale auto's value
        "coefficients": {"method": coefficients.method, "granularity": coefficients.granularity, **spec.effective_coefficient_options()},
        "adapters": [
            {"name": entry["name"], "path": entry["path"], "norm": record["norms"][entry["name"]], "coefficient": None if per_adapter is None else per_adapter[entry["name"]]}
            for entry in record["inputs"]
        ],
        "modules": modules,
        "serve": options["serve"],
        "tensor_parallel": options.get("tensor_parallel"),
        "engine_version": options.get("engine_version"),
        "fold_into": options.get("fold_into"),
        "heads": {
            "mode": options["heads"],
            "shared": sorted(result.shared_saved),
            "tasks": {name: sorted(tensors) for name, tensors in sorted(result.heads.items())},
        },
    }
