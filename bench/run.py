"""python -m bench [--quick] [--only norms,svd,cat,cli,fold,many] [--baseline REF]: speed and memory of nan-peft
against peft, mergekit and the hardware, on synthetic adapters shaped like real ones.

Writes bench/results/<machine>.json and bench/results/<machine>.md (the table the README quotes). Every
figure is a ratio of contenders timed side by side in one process, interleaved, median of --repeat runs;
peak memory is measured contender by contender, each in a fresh process. Sections:

  norms  update_gram (every <dW_i, dW_j> from r x r Grams) vs reading every tensor once (the bandwidth floor),
         vs the float64 GEMM rate (the compute floor) and vs forming each dense update
  svd    merge to rank r vs peft's add_weighted_adapter(combination_type="svd") on 4096-wide modules
  cat    exact merge vs peft's combination_type="cat"
  cli    `nan-peft merge` of three Llama-7B-shaped adapters, end to end: wall time and peak memory
  fold   folding the merge into a base checkpoint vs copying the checkpoint, and vs mergekit's model+lora
  spectral  the spectral rules (iso_c, iso_cts, tsv, wudi, knots_*, svc): each in the core space vs the same rule on
         the module's dense updates (FusionBench's way); and `nan-peft merge --method RULE` on three Llama-7B-shaped
         adapters against today's `--combine svd`
  full   merging full fine-tuned checkpoints (`nan-peft merge --base`) vs mergekit-yaml task_arithmetic, 1B-shaped
  many   a K sweep (4, 16, 64, 256 adapters; 4 and 16 with --quick) of Llama-7B-shaped rank-16 adapters on one layer's
         7 modules: norms, cat and svd to rank 64 (randomized truncation where R is large) vs peft's dense svd

--baseline REF times the nan_peft package of git revision REF beside the working tree's (before/after).
The GPU is used too when one is present (norms, svd, cat and fold run on both; --devices picks, e.g.
--devices cuda for the GPU cases alone). A case on a GPU has its inputs resident there, its label ends in
"on cuda", and its peak GPU memory (torch.cuda.max_memory_allocated) is reported beside the host's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if __name__ == "__main__" and not __package__:  # python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from . import report  # noqa: E402
from .measure import ROOT, load_average, machine, machine_slug, process_peak, run_worker  # noqa: E402
from .worker import has_peak  # noqa: E402

SECTIONS = ("norms", "svd", "cat", "cli", "fold", "many", "spectral", "extract", "full")
MANY = (4, 16, 64, 256)  # the K sweep (many); --quick runs the first two
RESULTS = ROOT / "bench" / "results"


def plan(quick: bool, devices: list[str]) -> dict[str, list[dict]]:
    """The cases of each section: (label, worker case, parameters)."""
    repeat = 3 if quick else 5
    slow = 1 if quick else 3  # repetitions of cases whose peer takes many seconds a call
    norms = [("llama-7b", 16), ("small", 16)] if quick else [("llama-7b", 16), ("llama-7b", 64), ("small", 16)]
    out: dict[str, list[dict]] = {name: [] for name in SECTIONS}
    for device in devices:
        on = "" if device == "cpu" else f", on {device}"
        for shape, r in norms:
            out["norms"].append({"label": f"{shape} r={r}, 3 adapters{on}", "case": "norms",
                                 "params": {"shape": shape, "r": r, "dense_layers": 1, "repeat": repeat, "device": device}})
        for shape, r, projections in [("llama-7b", 16, ["q_proj"]), ("small", 16, ["q_proj", "k_proj", "v_proj", "o_proj"])] + (
            [] if quick else [("llama-7b", 64, ["q_proj"])]
        ):
            out["svd"].append({"label": f"{shape} r={r}, 3 adapters, {len(projections)} module(s) {_width(shape)}, to rank {r}{on}",
                               "case": "merge", "params": {"shape": shape, "r": r, "combine": "svd", "projections": projections,
                                                           "layers": 1, "repeat": slow, "device": device}})
        if not quick:  # the whole model, nan-peft alone (peft: about 10 s a 4096-wide module here, 224 modules)
            out["svd"].append({"label": f"llama-7b r=16, 3 adapters, all 224 modules, to rank 16 (nan-peft only){on}", "case": "merge",
                               "params": {"shape": "llama-7b", "r": 16, "combine": "svd", "projections": list(_all()), "layers": 32,
                                          "peft": False, "repeat": repeat, "device": device}})
        layers = 1 if quick else 4
        out["cat"].append({"label": f"llama-7b r=16, 3 adapters, {layers} layer(s) x 7 modules{on}", "case": "merge",
                           "params": {"shape": "llama-7b", "r": 16, "combine": "cat", "projections": list(_all()), "layers": layers,
                                      "repeat": repeat, "device": device}})
        fold_shape = "small" if quick else "fold"
        out["fold"].append({"label": f"{fold_shape} bfloat16 base, 3 adapters r=16 on all 7 projections{on}", "case": "fold",
                            "params": {"shape": fold_shape, "r": 16, "repeat": 2 * repeat - 1,  # fsync times swing with the neighbours
                                       "commands_repeat": slow if device == "cpu" else 0, "device": device}})
    for device in devices:
        on = "" if device == "cpu" else f", on {device}"
        for count in MANY[:2] if quick else MANY:
            out["many"].append({"label": f"llama-7b r=16, K={count} adapters, 1 layer x 7 modules, svd to rank 64{on}", "case": "many",
                                "params": {"shape": "llama-7b", "r": 16, "count": count, "rank": 64, "layers": 1, "device": device,
                                           "repeat": 3 if count <= 16 else 2 if count <= 64 else 1,
                                           # peft's svd holds all K dense deltas at once: 16 GiB at K = 256, more than this machine has
                                           "peft": not quick and count <= 64,
                                           "check_modules": 7 if count <= 64 else 1}})
        if device == "cpu" and not quick:  # the target's own case: every layer in one process (10 GiB of adapters)
            out["many"].append({"label": "llama-7b r=16, K=64 adapters, the whole model (32 layers x 7 modules), svd to rank 64",
                                "case": "many", "params": {"shape": "llama-7b", "r": 16, "count": 64, "rank": 64, "layers": 32,
                                                           "device": device, "repeat": 1, "peft": False, "check_modules": 1}})
    from .cases import SPECTRAL_RULES

    spectral_shape = "small" if quick else "llama-7b"
    for rule in SPECTRAL_RULES:
        out["spectral"].append({"label": f"{rule}: {spectral_shape} q_proj ({_width(spectral_shape)}), 3 adapters r=16", "case": "spectral",
                                "params": {"shape": spectral_shape, "r": 16, "rule": rule, "repeat": slow, "device": "cpu"}})
    if "cpu" in devices:
        out["spectral"].append({"label": "llama-7b r=16, 3 adapters (float32 safetensors), 224 modules each: nan-peft merge --method RULE",
                                # three runs even with --quick: a 2x verdict from one run of each command is the machine's noise
                                "case": "cli", "params": {"shape": "llama-7b", "r": 16, "repeat": 3, "spectral": True}})
    if "cpu" in devices:  # the command line's target is for the CPU
        out["cli"].append({"label": "llama-7b r=16, 3 adapters (float32 safetensors), 224 modules each", "case": "cli",
                           "params": {"shape": "llama-7b", "r": 16, "repeat": slow}})
    extract_shape = "small" if quick else "fold"
    for device in devices:
        on = "" if device == "cpu" else f", on {device}"
        out["extract"].append({"label": f"{extract_shape} bfloat16 fine-tune ({_width(extract_shape)}), 7 projections x "
                                        f"{_layers(extract_shape)} layers, to rank 16{on}", "case": "extract",
                               "params": {"shape": extract_shape, "r": 16, "repeat": 2 if quick else 3, "device": device}})
    if "cpu" in devices:  # whole processes on the CPU, nan-peft's and mergekit's
        out["full"].append({"label": f"1b-shaped (2048 wide, {4 if quick else 22} layers, vocabulary 32000) bfloat16 base and 2 full "
                                     "fine-tunes: merge", "case": "full", "params": {"shape": "1b", "quick": quick, "repeat": 1 if quick else 3}})
    return out


def _width(shape: str) -> str:
    from .synthetic import SHAPES

    return f"{SHAPES[shape].hidden}x{SHAPES[shape].hidden}"


def _layers(shape: str) -> int:
    from .synthetic import SHAPES

    return SHAPES[shape].layers


def _all():
    from .synthetic import PROJECTIONS

    return PROJECTIONS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a minutes-long version: fewer shapes and repetitions")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--baseline", metavar="REF", help="also time the nan_peft of this git revision (before/after)")
    parser.add_argument("--devices", default=None,
                        help="comma-separated devices to run the cases on (default: cpu, and cuda when present)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--omp-passive", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE: on a machine another job keeps busy, OpenMP threads that spin "
                             "while waiting for a busy core make every parallel kernel wait for the scheduler (measured: "
                             "update_gram 3 s instead of 0.1 s); passive waiting avoids that, at a small cost per kernel")
    parser.add_argument("--mergekit", default=None, metavar="PYTHON",
                        help="a Python interpreter with mergekit installed (default: this one if it has mergekit, else "
                             "/tmp/mk/bin/python if present); mergekit is skipped when there is none")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    parser.add_argument("--name", default=None, help="result file name (default: a description of the machine)")
    parser.add_argument("--scratch", default=None, help="folder for temporary inputs and outputs (default: the system's)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds-long: the smoke test
    args = parser.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch loads its OpenMP runtime; the workers inherit it
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.devices:
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        if any(d != "cpu" and not (d.startswith("cuda") and torch.cuda.is_available()) for d in devices) or not devices:
            parser.error(f"--devices {args.devices}: this machine has cpu{', cuda' if torch.cuda.is_available() else ''}")
    started = time.time()
    info = machine()
    name = args.name or machine_slug(info)
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "machine": info,
        "run": {"command": command.strip(), "quick": args.quick, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
                "load_average_before": load_average(), "baseline": args.baseline},
        "sections": {},
    }
    scratch = Path(args.scratch) if args.scratch else None
    cases = tiny_plan(devices) if args.tiny else plan(args.quick, devices)
    common = {"threads": args.threads}

    def log(message: str) -> None:
        print(f"[{time.time() - started:6.0f} s] {message}", flush=True)

    baseline = _export_baseline(args.baseline, scratch) if args.baseline else None
    try:
        for section in sections:
            entries = []
            for case in cases[section]:
                log(f"{section}: {case['label']}")
                params = {**case["params"], **common, "baseline": str(baseline) if baseline else None}
                if case["case"] == "cli":
                    entry = cli_case(params, scratch, baseline)
                elif case["case"] == "extract":
                    entry = extract_case({**params, "mergekit": _mergekit_python(args.mergekit) == sys.executable}, scratch)
                elif case["case"] == "fold":
                    entry = fold_case(params, scratch, _mergekit_python(args.mergekit))
                elif case["case"] == "full":
                    from .full import full_case

                    entry = full_case(params, scratch, _mergekit_python(args.mergekit))
                else:
                    entry = worker_case(case["case"], params)
                entry.update({"case": case["label"], "params": {k: v for k, v in params.items() if k != "baseline"}})
                entries.append(report.derive(section, entry))
                log("  " + report.one_line(section, entries[-1]))
            results["sections"][section] = entries
    finally:
        if baseline:
            shutil.rmtree(baseline, ignore_errors=True)
    results["run"]["seconds"] = round(time.time() - started, 1)
    results["run"]["load_average_after"] = load_average()
    results["targets"] = report.targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(report.markdown(results))
    log(f"wrote {args.out / name}.json and .md")
    print(report.markdown(results))
    return 0


def tiny_plan(devices: list[str]) -> dict[str, list[dict]]:
    """Seconds-long cases on tiny shapes, for the smoke test of the harness."""
    params = {"shape": "tiny", "r": 4, "repeat": 2, "device": devices[0], "inline": True}
    return {
        "norms": [{"label": "tiny", "case": "norms", "params": {**params, "dense_layers": 1}}],
        "svd": [{"label": "tiny", "case": "merge", "params": {**params, "combine": "svd", "projections": ["q_proj"]}}],
        "cat": [{"label": "tiny", "case": "merge", "params": {**params, "combine": "cat", "projections": list(_all())}}],
        "cli": [{"label": "tiny", "case": "cli", "params": {**params, "repeat": 1}}],
        "fold": [{"label": "tiny", "case": "fold", "params": {**params, "repeat": 1}}],
        "many": [{"label": f"tiny K={count}", "case": "many", "params": {**params, "count": count, "rank": 8, "peft": True}} for count in (4, 8)],
        "spectral": [{"label": "tiny tsv", "case": "spectral", "params": {**params, "rule": "tsv + svc"}}],
        "extract": [{"label": "tiny", "case": "extract", "params": {**params, "repeat": 1}}],
        "full": [{"label": "tiny", "case": "full", "params": {**params, "repeat": 1}}],
    }


def worker_case(case: str, params: dict) -> dict:
    """Time the case's contenders in one fresh process, then measure each one's peak memory in a fresh process
    of its own. params["inline"] (the smoke test): all in this process, peaks after the timings (rough)."""
    if params.get("inline"):
        from .worker import run_case

        first = run_case(case, {**params, "inline_peaks": True})
        measured = first["peak"]
    else:
        first = run_worker(case, params)
        measured = {name: run_worker(case, {**params, "peak": name})["peak"][name] for name in filter(has_peak, first["times"])}
    entry = {"times": first["times"], "peaks": {name: value["peak_increase"] for name, value in measured.items()},
             "check": first["check"], "info": first["info"]}
    gpu = {name: value["gpu_peak_increase"] for name, value in measured.items() if "gpu_peak_increase" in value}
    if gpu:
        entry["gpu_peaks"] = gpu
    return entry


def cli_case(params: dict, scratch: Path | None, baseline: Path | None) -> dict:
    """`nan-peft merge` end to end in fresh processes: wall time and whole-process peak memory (VmHWM)."""
    from .cases import SPECTRAL_RULES, scratch_folder
    from .synthetic import SHAPES, write_adapters

    root = scratch_folder(scratch)
    try:
        folders = [str(f) for f in write_adapters(root / "adapters", SHAPES[params["shape"]], params["r"], 3)]
        entry = [sys.executable, "-m", "bench.peakwrap", "nan_peft.cli:main"]
        r = params["r"]
        commands = {"nan-peft merge (cat, exact)": (entry + ["merge", *folders, "-o", str(root / "cat"), "--force", "--quiet"], None)}
        if not params.get("inline"):  # the smoke test runs one command
            commands["nan-peft --version (interpreter and imports)"] = (entry + ["--version"], None)
            commands[f"nan-peft merge --combine svd --rank {r}"] = (
                entry + ["merge", *folders, "-o", str(root / "svd"), "--combine", "svd", "--rank", str(r), "--force", "--quiet"], None)
        if baseline:
            commands["nan-peft merge (cat, exact) (before)"] = (entry + ["merge", *folders, "-o", str(root / "cat-before"), "--force", "--quiet"], baseline)
            commands[f"nan-peft merge --combine svd --rank {r} (before)"] = (
                entry + ["merge", *folders, "-o", str(root / "svd-before"), "--combine", "svd", "--rank", str(r), "--force", "--quiet"], baseline)
        if params.get("spectral"):  # today's svd beside each spectral rule's exact merge
            commands = {f"nan-peft merge --combine svd --rank {r}": commands[f"nan-peft merge --combine svd --rank {r}"]}
            for rule, options in SPECTRAL_RULES.items():
                flags = [f"--{key}={value}" for key, value in options.items()]
                commands[f"nan-peft merge --method {rule.split(' ')[0]} {' '.join(flags)}".strip()] = (
                    entry + ["merge", *folders, "-o", str(root / "spectral"), "--method", rule.split(" ")[0], *flags, "--force", "--quiet"], None)
            commands["nan-peft merge --method tsv --scale auto"] = (  # auto: the rule's merged norms measured, then the merge
                entry + ["merge", *folders, "-o", str(root / "spectral"), "--method", "tsv", "--scale", "auto", "--force", "--quiet"], None)
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for _ in range(params.get("repeat", 3)):
            for name, (command, old) in commands.items():
                runs[name].append(_cli_run(command, old))
        sizes = sum(Path(f, "adapter_model.safetensors").stat().st_size for f in folders)
        return _process_entry(runs, {"input_bytes": sizes, "output_bytes": _folder_bytes(root / "cat")})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _cli_run(command: list[str], baseline: Path | None) -> dict:
    """One CLI run; with a baseline, the older package comes first on the path and the run starts outside the
    working tree (whose nan_peft would otherwise be found first)."""
    if baseline is None:
        return process_peak(command, cwd=ROOT)
    env = {"PYTHONPATH": os.pathsep.join([str(baseline), str(ROOT)])}
    return process_peak(command, cwd=baseline, env=env)


def extract_case(params: dict, scratch: Path | None) -> dict:
    """The extract case (bench.extraction): a base checkpoint and its synthetic fine-tune written once, then the
    extractions timed in a worker (params["mergekit"]: mergekit-extract-lora runs in that same interpreter)."""
    from .cases import scratch_folder
    from .extraction import write_fine_tune
    from .synthetic import SHAPES, write_base

    root = scratch_folder(scratch)
    try:
        write_base(root / "base", SHAPES[params["shape"]], vocab=512 if params["shape"] == "tiny" else 32000)
        write_fine_tune(root / "base", root / "fine-tune")
        return worker_case("extract", {**params, "base": str(root / "base"), "fine_tune": str(root / "fine-tune"), "scratch": str(root / "out")})
    finally:
        shutil.rmtree(root, ignore_errors=True)


def fold_case(params: dict, scratch: Path | None, mergekit: str | None) -> dict:
    """Fold timings in one worker process (with peaks each in their own), then the two command lines that fold one
    adapter, nan-peft's and mergekit's, as whole processes."""
    from .cases import scratch_folder
    from .synthetic import SHAPES, write_adapters, write_base

    root = scratch_folder(scratch)
    try:
        shape = SHAPES[params["shape"]]
        vocab = 512 if params["shape"] == "tiny" else 32000
        write_base(root / "base", shape, vocab=vocab)
        adapters = [str(f) for f in write_adapters(root / "adapters", shape, params["r"], 3)]
        worker = {**params, "base": str(root / "base"), "adapters": adapters}
        entry = worker_case("fold", {**worker, "scratch": str(root / "out")})
        if params.get("commands_repeat", 3):  # the CLI and mergekit, once per run: not again for the GPU
            entry.update(_fold_commands(root, adapters[0], params, mergekit))
        return entry
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fold_commands(root: Path, adapter: str, params: dict, mergekit: str | None) -> dict:
    """nan-peft merge --fold-into vs mergekit-yaml with `base+adapter` (peft's merge_and_unload, then a
    passthrough merge), one adapter, whole processes side by side."""
    ours = [sys.executable, "-m", "bench.peakwrap", "nan_peft.cli:main", "merge", adapter, "-o", str(root / "cli-fold"),
            "--fold-into", str(root / "base"), "--force", "--quiet"]
    commands = {"nan-peft merge --fold-into (1 adapter, CLI)": (ours, ("cli-fold",))}
    notes = {}
    if mergekit:
        config = root / "mergekit.yml"
        config.write_text(f"merge_method: passthrough\nmodels:\n  - model: {root / 'base'}+{adapter}\ndtype: bfloat16\n")
        command = [mergekit, "-m", "bench.peakwrap", "mergekit.scripts.run_yaml:main", str(config), str(root / "mergekit"),
                   "--lora-merge-cache", str(root / "mergekit-cache"), "--no-copy-tokenizer"]
        commands["mergekit-yaml base+lora (1 adapter, CLI)"] = (command, ("mergekit", "mergekit-cache"))
    else:
        notes["mergekit"] = "not installed: skipped (pass --mergekit PYTHON, an interpreter that has it)"
    runs: dict[str, list[dict]] = {name: [] for name in commands}
    for _ in range(params.get("commands_repeat", 3)):
        for name, (command, outputs) in commands.items():
            for stale in outputs:
                shutil.rmtree(root / stale, ignore_errors=True)
            runs[name].append(process_peak(command, cwd=ROOT))
    processes = _process_entry(runs, {})
    if mergekit and (root / "mergekit").exists():
        notes["mergekit vs nan-peft, max |difference|"] = _compare_folds(root / "cli-fold", root / "mergekit") if (root / "cli-fold").exists() else None
    return {"processes": processes["processes"], "notes": notes}


def _compare_folds(ours: Path, theirs: Path) -> float:
    """Largest difference between the same tensor of two folded checkpoints (their shards may differ)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        out = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as handle:
                out.update(dict.fromkeys(handle.keys(), file))
        return out

    mine, other = tensors(ours), tensors(theirs)
    worst = 0.0
    for key in sorted(set(mine) & set(other))[:64]:
        with safe_open(mine[key], "pt") as a, safe_open(other[key], "pt") as b:
            worst = max(worst, float((a.get_tensor(key).float() - b.get_tensor(key).float()).abs().max()))
    return worst


def _process_entry(runs: dict[str, list[dict]], info: dict) -> dict:
    import statistics

    processes = {
        name: {"median": statistics.median(r["wall"] for r in values), "times": [r["wall"] for r in values],
               "peak": max((r["peak"] or 0) for r in values) or None}
        for name, values in runs.items()
    }
    return {"processes": processes, "peaks": {}, "check": {}, "info": info}


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def _mergekit_python(given: str | None) -> str | None:
    """An interpreter that can import mergekit, or None."""
    candidates = [given] if given else [sys.executable, "/tmp/mk/bin/python"]
    for python in candidates:
        if python and Path(python).exists():
            found = subprocess.run([python, "-c", "import mergekit"], capture_output=True)
            if found.returncode == 0:
                return python
    return None


def _export_baseline(ref: str, scratch: Path | None) -> Path:
    """The nan_peft package of git revision `ref`, exported into a temporary folder (returned)."""
    from .cases import scratch_folder

    folder = scratch_folder(scratch)
    archive = subprocess.run(["git", "archive", ref, "nan_peft"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


if __name__ == "__main__":
    sys.exit(main())
