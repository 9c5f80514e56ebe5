"""The benchmark cases. Each builds its inputs from its parameters and returns a Case: named contenders timed
side by side (bench.measure.interleaved), and a check that they computed the same thing. A case runs in a fresh
process (bench.worker); its peak memory is measured contender by contender, each in a process of its own.

Parameters common to every case: shape (bench.synthetic.SHAPES), r, count (adapters), device, baseline (a
folder holding an older nan_peft package to time beside the current one, or None).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import extraction
from .synthetic import ATTENTION, PROJECTIONS, SHAPES, lora_adapters, peft_model

WEIGHTS = (0.5, 0.3, 0.2, 0.1, 0.1, 0.1)  # manual weights given to peft and nan-peft alike


@dataclass
class Case:
    contenders: dict[str, Callable[[], object]]
    """name -> the measured call."""
    setup: dict[str, Callable[[], object]] = field(default_factory=dict)
    """name -> an untimed call before each measured one (removing a previous output)."""
    info: dict = field(default_factory=dict)
    """What the inputs were (sizes, flops), filled in by the case."""
    check: Callable[[], dict] | None = None
    """Run after timing: how far the contenders' results are from each other."""
    warmup: tuple[str, ...] | None = None
    """Contenders to call once, untimed, before timing (None: all)."""
    cleanup: Callable[[], None] | None = None


def baseline_package(folder: str | None):
    """The nan_peft package found in `folder` imported as nan_peft_baseline (None without a folder)."""
    if not folder:
        return None
    if "nan_peft_baseline" in sys.modules:
        return sys.modules["nan_peft_baseline"]
    init = Path(folder) / "nan_peft" / "__init__.py"
    spec = importlib.util.spec_from_file_location("nan_peft_baseline", init, submodule_search_locations=[str(init.parent)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["nan_peft_baseline"] = package
    spec.loader.exec_module(package)
    return package


def _submodule(package, name: str):
    return importlib.import_module(f"{package.__name__}.{name}")


def rewrap(adapters, package):
    """The same adapters (the same tensors) as instances of `package`'s own LoraAdapter and LoraModule."""
    lora = _submodule(package, "lora")
    return [
        lora.LoraAdapter(a.name, a.source, a.config, {p: lora.LoraModule(m.A, m.B, m.scale) for p, m in a.modules.items()})
        for a in adapters
    ]


# ----------------------------------------------------------------------------------------------------------
# 1. Norms: the Gram path against forming each dense update, the read floor and the float64 compute floor


def norms(params: Mapping) -> Case:
    shape, r, count, device = SHAPES[params["shape"]], params["r"], params.get("count", 3), params.get("device", "cpu")
    dense_layers = params.get("dense_layers", 1)
    import nan_peft
    from nan_peft.norms import update_gram

    adapters = lora_adapters(shape, r, count, device=device)
    subset = lora_adapters(shape, r, count, layers=dense_layers, device=device)
    tensors = [t for a in adapters for m in a.modules.values() for t in (m.A, m.B)]
    contenders = {"read floor (sum of every tensor)": lambda: [t.sum() for t in tensors]}
    if device == "cpu":
        contenders["read floor (sum of every tensor), 1 thread"] = lambda: _one_thread(lambda: [t.sum() for t in tensors])
    contenders["nan-peft update_gram"] = lambda: update_gram(adapters, device)
    baseline = baseline_package(params.get("baseline"))
    if baseline is not None:
        old, theirs = _submodule(baseline, "norms").update_gram, rewrap(adapters, baseline)
        contenders["nan-peft update_gram (before)"] = lambda: old(theirs, device)
    contenders[f"nan-peft update_gram, {dense_layers} layer(s)"] = lambda: update_gram(subset, device)
    contenders[f"dense B@A float32, {dense_layers} layer(s)"] = lambda: dense_inner_products(subset, device)
    contenders["float64 GEMM rate probe"] = _gemm_probe(device, count * r)

    flops = sum(2 * sum(m.rank for m in ms) ** 2 * (ms[0].A.shape[1] + ms[0].B.shape[0]) for ms in _by_module(adapters))

    def check() -> dict:
        ours = nan_peft.update_gram(subset, device).inner
        dense = dense_inner_products(subset, device, torch.float64)
        scale = ours.diagonal(dim1=-2, dim2=-1).amax()
        return {"max |gram - dense float64| / max norm^2": float((ours - dense).abs().max() / scale)}

    info = {
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "modules": len(adapters[0].modules),
        "gram_flops": flops,
        "probe_flops": probe_flops(count * r, _probe_batch(device)),
        "dense_layers": dense_layers,
    }
    return Case(contenders, info=info, check=check)


def _one_thread(function):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function()
    finally:
        torch.set_num_threads(threads)


def dense_inner_products(adapters, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The plain way: every dense update s B A formed, then all K x K Frobenius inner products, per module."""
    out = []
    for modules in _by_module(adapters):
        flat = torch.stack([(m.scale * (m.B.to(device, dtype) @ m.A.to(device, dtype))).reshape(-1) for m in modules])
        out.append((flat @ flat.T).to("cpu", torch.float64))
    return torch.stack(out)


def _by_module(adapters):
    return [[a.modules[path] for a in adapters] for path in sorted(adapters[0].modules)]


def _probe_batch(device) -> int:
    """Pieces per probe product: a few fit a CPU's cache; a GPU needs many to be busy rather than waiting on launches."""
    return 4 if str(device) == "cpu" else 256


def probe_flops(R: int, batch: int = 4) -> int:
    return 2 * batch * R * R * 4096 * 10


def _gemm_probe(device, R: int, dtype=torch.float64):
    """The Grams' compute floor: batched products of their shape (A A^T of R x 4096 pieces) on data already in
    cache, probe_flops(R, _probe_batch(device)) of them."""
    piece = torch.randn(_probe_batch(device), R, 4096, dtype=dtype, device=device)
    out = torch.zeros(_probe_batch(device), R, R, dtype=dtype, device=device)

    def probe():
        for _ in range(10):
            out.baddbmm_(piece, piece.mT)

    return probe


# ----------------------------------------------------------------------------------------------------------
# 2. Merging to rank r (svd) and cat: nan-peft against peft's add_weighted_adapter on the same adapters


def merge(params: Mapping) -> Case:
    """combine svd or cat (params["combine"]) on `layers` layers of `projections`."""
    shape, r, count = SHAPES[params["shape"]], params["r"], params.get("count", 3)
    combine, device = params["combine"], params.get("device", "cpu")
    projections, layers = tuple(params.get("projections", ATTENTION)), params.get("layers", 1)
    weights = list(WEIGHTS[:count])
    rank = params.get("rank", r) if combine == "svd" else None
    import nan_peft
    from nan_peft.coefficients import coefficients_for
    from nan_peft.combination import combine as combine_updates

    adapters = lora_adapters(shape, r, count, projections, layers, device=device)
    with_peft = params.get("peft", True)
    model = peft_model(shape, r, count, projections, layers, device) if with_peft else None
    names = [a.name for a in adapters]
    gram = nan_peft.update_gram(adapters, device)
    coefficients = coefficients_for("manual", gram, weights=weights)
    options = {"combine": combine, "rank": rank, "coefficients": weights, "device": device}
    results = {}

    def ours():
        results["nan-peft"] = nan_peft.merge_adapters(adapters, **options)

    def peft_merge():
        if "merged" in model.peft_config:
            model.delete_adapter("merged")
        model.add_weighted_adapter(names, weights, "merged", combination_type=combine, svd_rank=rank)

    contenders = {f"nan-peft merge_adapters {combine}": ours}
    baseline = baseline_package(params.get("baseline"))
    if baseline is not None:
        theirs = rewrap(adapters, baseline)
        contenders[f"nan-peft merge_adapters {combine} (before)"] = lambda: baseline.merge_adapters(theirs, **options)
    contenders[f"nan-peft combine only {combine}"] = lambda: combine_updates(adapters, coefficients, gram, combine, rank, device)
    if with_peft:
        contenders[f"peft add_weighted_adapter {combine}"] = peft_merge

    def check() -> dict:
        if not with_peft:
            return {}
        if "merged" not in model.peft_config:
            peft_merge()
        worst = 0.0
        for path, module in list(results["nan-peft"].adapter.modules.items())[:4]:
            layer = model.base_model.model.get_submodule(path)
            theirs = layer.get_delta_weight("merged").double().cpu()
            mine = module.scale * (module.B.double() @ module.A.double())
            worst = max(worst, float((theirs - mine).norm() / mine.norm()))
        return {"max relative difference from peft's merge": worst}

    info = {
        "modules": len(adapters[0].modules),
        "module_shapes": sorted({f"{m.B.shape[0]}x{m.A.shape[1]}" for m in adapters[0].modules.values()}),
        "rank": rank,
        "weights": weights,
    }
    warmup = None if combine == "cat" else tuple(name for name in contenders if not name.startswith("peft"))
    return Case(contenders, info=info, check=check, warmup=warmup)


# ----------------------------------------------------------------------------------------------------------
# 4. Fold: the merged update folded into a base checkpoint, against copying the checkpoint and mergekit


def update_probe_flops(R: int, batch: int = 4) -> int:
    return 2 * 64 * batch * R * 4096 * 40


def _update_probe(device, R: int):
    """The fold's arithmetic floor: W_rows += B_rows @ A in float32 (64 * _probe_batch rows: a block in a CPU's
    cache, a GPU-filling one on a GPU), update_probe_flops(R, _probe_batch(device)) of them."""
    rows = 64 * _probe_batch(device)
    left = torch.randn(rows, R, device=device)
    right = torch.randn(R, 4096, device=device)
    out = torch.zeros(rows, 4096, device=device)

    def probe():
        for _ in range(40):
            out.addmm_(left, right)

    return probe


def fold(params: Mapping) -> Case:
    """params: base (a checkpoint folder), adapters (peft folders), scratch (a folder for outputs)."""
    import transformers

    transformers.LlamaForCausalLM  # the fold imports it (tied weights): ~130 MiB of code, kept out of its peak
    from safetensors.torch import load_file, save_file

    import nan_peft

    base, scratch = Path(params["base"]), Path(params["scratch"])
    adapters, device = [Path(p) for p in params["adapters"]], params.get("device", "cpu")
    result = nan_peft.merge_adapters([str(p) for p in adapters], device=device)
    single = nan_peft.merge_adapters([str(adapters[0])], device=device)
    outputs = {}

    def output(name: str) -> Path:
        """A fresh output folder, and no dirty pages left by earlier contenders to be written during this one."""
        folder = scratch / name
        shutil.rmtree(folder, ignore_errors=True)
        os.sync()
        outputs[name] = folder
        return folder

    def safetensors_copy(name: str = "copy", durable: bool = False):
        target = outputs[name]
        target.mkdir(parents=True)
        for file in sorted(base.glob("*.safetensors")):
            save_file(load_file(file), target / file.name, metadata={"format": "pt"})
        for file in base.iterdir():
            if not file.name.endswith(".safetensors"):
                shutil.copyfile(file, target / file.name)
        if durable:  # what nan-peft's atomic publish does before renaming its output into place
            for file in target.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())

    def kernel_copy():
        shutil.copytree(base, outputs["cp"])

    contenders = {
        "safetensors load + save copy": safetensors_copy,
        "safetensors load + save copy, fsynced": lambda: safetensors_copy("copy-synced", durable=True),
        "file copy (shutil.copytree)": kernel_copy,
        "nan-peft fold_into, 3 adapters": lambda: result.fold_into(base, outputs["fold3"], device=device),
        "nan-peft fold_into, 1 adapter": lambda: single.fold_into(base, outputs["fold1"], device=device),
    }
    setup = {
        "safetensors load + save copy": lambda: output("copy"),
        "safetensors load + save copy, fsynced": lambda: output("copy-synced"),
        "file copy (shutil.copytree)": lambda: output("cp"),
        "nan-peft fold_into, 3 adapters": lambda: output("fold3"),
        "nan-peft fold_into, 1 adapter": lambda: output("fold1"),
    }
    baseline = baseline_package(params.get("baseline"))
    if baseline is not None:
        before = baseline.merge_adapters([str(p) for p in adapters], device=device)
        contenders["nan-peft fold_into, 3 adapters (before)"] = lambda: before.fold_into(base, outputs["fold3-before"], device=device)
        setup["nan-peft fold_into, 3 adapters (before)"] = lambda: output("fold3-before")

    def check() -> dict:
        from safetensors import safe_open

        if "fold3-before" not in outputs or not outputs["fold3-before"].exists():
            return {}
        worst = 0.0
        for file in sorted(outputs["fold3"].glob("*.safetensors")):
            with safe_open(file, "pt") as new, safe_open(outputs["fold3-before"] / file.name, "pt") as old:
                for key in new.keys():
                    a, b = new.get_tensor(key).float(), old.get_tensor(key).float()
                    worst = max(worst, float((a - b).abs().max()))
        return {"max |fold - fold before|": worst}

    contenders["float32 GEMM rate probe"] = _update_probe(device, params["r"] * len(adapters))
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    touched = SHAPES[params["shape"]].parameters()  # the adapters adapt every projection of every layer
    total_rank = params["r"] * len(adapters)
    info = {"model_bytes": size, "fold_flops": 2 * total_rank * touched, "probe_flops": update_probe_flops(total_rank, _probe_batch(device))}
    return Case(contenders, setup=setup, info=info, check=check, cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True))


# ----------------------------------------------------------------------------------------------------------
# 5. Many adapters: norms, cat and svd for K adapters (a K sweep), against peft's dense svd and the floors


def many(params: Mapping) -> Case:
    """K = params["count"] adapters of rank r on `layers` layers of every projection: update_gram, combine cat
    (exact), combine svd to `rank` (truncation auto: exact for small R, randomized for large; the Grams summed again)
    and merge_sources' svd (what a merge runs: each adapter's norms, then one pass of Grams for the truncation and the
    inner products; on more than one layer, alone), against reading
    every tensor once, the float64 GEMM rate, and peft's add_weighted_adapter(svd) on one q_proj module (dense:
    about constant in K). The check compares each svd-truncated module's discarded norm with the optimum (the
    singular values of the exact merge) on `check_modules` modules."""
    shape, r, count, device = SHAPES[params["shape"]], params["r"], params["count"], params.get("device", "cpu")
    projections, layers, rank = tuple(params.get("projections", PROJECTIONS)), params.get("layers", 1), params["rank"]
    from nan_peft.coefficients import coefficients_for
    from nan_peft.combination import combine as combine_updates
    from nan_peft.merge import merge_sources
    from nan_peft.norms import update_gram, update_norms
    from nan_peft.spec import MergeSpec
    from nan_peft.truncation import DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS, truncation_path

    adapters = lora_adapters(shape, r, count, projections, layers, device=device)
    tensors = [t for a in adapters for m in a.modules.values() for t in (m.A, m.B)]
    gram = update_gram(adapters, device) if layers == 1 else None  # the whole model: only the one-pass merge is timed
    coefficients = coefficients_for("nan", gram or update_norms(adapters, device))
    results = {}

    def svd():
        results["svd"] = combine_updates(adapters, coefficients, gram, "svd", rank, device)

    def one_pass():
        result = merge_sources(adapters, MergeSpec(combine="svd", rank=rank, device=str(device)))
        results["svd"] = result.adapter.modules, result.report

    contenders = {
        "read floor (sum of every tensor)": lambda: [t.sum() for t in tensors],
        "nan-peft update_gram (norms)": lambda: update_gram(adapters, device),
        "nan-peft combine cat (exact)": lambda: combine_updates(adapters, coefficients, gram, "cat", None, device),
        f"nan-peft combine svd to rank {rank}": svd,
        f"nan-peft merge_sources svd to rank {rank} (norms, then one pass of Grams)": one_pass,
        "float64 GEMM rate probe": _gemm_probe(device, min(count * r, 1024)),
    }
    if layers > 1:  # the whole model: the merge a user runs (merge_sources), not its steps apart
        for name in ("nan-peft update_gram (norms)", "nan-peft combine cat (exact)", f"nan-peft combine svd to rank {rank}"):
            del contenders[name]
    model = None
    if params.get("peft", False):
        model = peft_model(shape, r, count, ("q_proj",), 1, device)
        names = [f"task{k}" for k in range(count)]
        weights = coefficients.per_adapter.tolist()  # NAN's, one per adapter

        def peft_merge():
            if "merged" in model.peft_config:
                model.delete_adapter("merged")
            model.add_weighted_adapter(names, weights, "merged", combination_type="svd", svd_rank=rank)

        contenders["peft add_weighted_adapter svd, 1 module (q_proj)"] = peft_merge
    R = count * r
    modules = shape.modules(projections, layers)
    oversample, iterations = DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS
    paths = {path: truncation_path(m, n, R, rank) for path, m, n in modules}

    def check() -> dict:
        import torch

        from nan_peft.combination import stacked_factors, weighted_terms

        if "svd" not in results:
            (svd if layers == 1 else one_pass)()
        _, report = results["svd"]
        report = {x.module: x for x in report}
        terms = weighted_terms(adapters, coefficients)
        worst = 0.0
        for path, _, _ in modules[: params.get("check_modules", len(modules))]:
            B, A = stacked_factors(terms[path], device)
            if R >= min(B.shape[0], A.shape[1]):
                S = torch.linalg.svdvals(B @ A)
            else:
                S = torch.linalg.svdvals(torch.linalg.qr(B).R @ torch.linalg.qr(A.mT).R.mT)
            optimum = float(S[rank:].square().sum().sqrt())  # 0 where R <= rank: then against the norm
            worst = max(worst, abs(report[path].discarded - optimum) / (optimum or report[path].norm))
        return {"max |discarded - optimal discarded| / optimal (svd)": worst,
                "relative discarded norm (svd, first module)": report[modules[0][0]].relative_discarded}

    flops = {
        "gram_flops": sum(2 * (m + n) * R * R for _, m, n in modules),
        "randomized_flops": sum(4 * (iterations + 1) * (m + n) * R * (rank + oversample) for _, m, n in modules),
        "probe_flops": probe_flops(min(count * r, 1024), _probe_batch(device)),
    }
    info = {
        "bytes": sum(t.numel() * t.element_size() for t in tensors), "modules": len(modules), "count": count, "R": R,
        "rank": rank, "truncation": sorted(set(paths.values())), "output_bytes_per_layer_svd": sum((m + n) * rank * 4 for _, m, n in modules) // layers,
        **flops,
    }
    warmup = () if count >= 64 else tuple(name for name in contenders if not name.startswith("peft"))
    return Case(contenders, info=info, check=check, warmup=warmup)


SPECTRAL_RULES = {"iso_c": {}, "iso_cts": {}, "tsv": {}, "wudi": {}, "knots_ties": {"density": 0.5}, "knots_dare": {"density": 0.5},
                  "tsv + svc": {"calibrate": "svc"}}


def spectral(params: Mapping) -> Case:
    """One spectral rule (params["rule"], a key of SPECTRAL_RULES) on one module (q_proj) of 3 adapters of rank r:
    nan-peft's merge in the core space (merge_sources: norms, coefficients, core merge, factors) against the same
    registered rule applied to the module's dense float32 updates, the way FusionBench computes it (every SVD of a
    full m x n matrix; WUDI in closed form there too, cheaper than FusionBench's 300 Adam steps)."""
    from nan_peft.merge import merge_sources
    from nan_peft.rules import RULES, module_generator
    from nan_peft.spec import MergeSpec

    shape, r, name = SHAPES[params["shape"]], params["r"], params["rule"]
    method = name.split(" ")[0]
    options = SPECTRAL_RULES[name]
    adapters = lora_adapters(shape, r, 3, projections=["q_proj"], layers=1)
    spec = MergeSpec(method=method, weights=(1.0, 1.0, 1.0), **options)
    path = next(iter(adapters[0].modules))
    weights = torch.ones(3, dtype=torch.float32)

    def dense():
        deltas = torch.stack([a.modules[path].scale * (a.modules[path].B @ a.modules[path].A) for a in adapters])
        generator = module_generator(0, path) if method == "knots_dare" else None  # the masks nan-peft draws (seed 0)
        return RULES[method](deltas, weights, generator, **options)

    def check():
        result = merge_sources(adapters, spec)
        ours = result.adapter.modules[path]
        theirs = dense().double()
        diff = (ours.B.double() @ ours.A.double() - theirs).abs().max() / theirs.abs().max()
        return {"dense float32 vs core float64, max |diff| / max |entry|": float(diff)}

    m, n = shape.hidden, shape.hidden
    return Case(
        contenders={f"nan-peft {name}, core space (merge_sources)": lambda: merge_sources(adapters, spec),
                    f"{name} on the dense updates (FusionBench's way)": dense},
        info={"module": f"{m}x{n}", "rank": 3 * r, "rule": name},
        check=check,
    )


CASES = {"norms": norms, "merge": merge, "fold": fold, "many": many, "spectral": spectral, "extract": extraction.extract}


def scratch_folder(root: str | None = None) -> Path:
    return Path(tempfile.mkdtemp(prefix="nan-peft-bench-", dir=root))


def dumps(value) -> str:
    return json.dumps(value, sort_keys=True)
