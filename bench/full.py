"""The full case: merging full fine-tuned checkpoints, `nan-peft merge --base BASE FT1 FT2 -o OUT` against
`mergekit-yaml` (task_arithmetic, its lazy safetensors loader, --lazy-unpickle), both as whole processes: wall
time and whole-process peak memory (VmHWM), on the same synthetic Llama checkpoints shaped like a 1B model
(TinyLlama's widths: hidden 2048, MLP 5632, vocabulary 32000; 22 layers, 4 with --quick), bfloat16 on disk;
the fine-tunes are the extract case's (bench.extraction.write_fine_tune: every projection moved, with other seeds).

Both compute in float32 and write bfloat16 (mergekit: dtype float32, out_dtype bfloat16), with the same weights;
nan-peft is also timed with NAN coefficients (two passes over the inputs: the norms, then the merge)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

WEIGHTS = (0.6, 0.4)


def full_case(params: dict, scratch: Path | None, mergekit: str | None) -> dict:
    """Write the base and two fine-tunes, then run each command params["repeat"] times, alternating."""
    from .cases import scratch_folder
    from .extraction import write_fine_tune
    from .measure import ROOT, process_peak
    from .run import _compare_folds, _folder_bytes, _process_entry
    from .synthetic import Shape, write_base

    root = scratch_folder(scratch)
    try:
        layers = 2 if params["shape"] == "tiny" else 4 if params.get("quick") else 22
        shape = Shape("1b", 64, 160, layers) if params["shape"] == "tiny" else Shape("1b", 2048, 5632, layers)
        size = write_base(root / "base", shape, vocab=512 if params["shape"] == "tiny" else 32000)
        fts = [root / "ft0", root / "ft1"]
        for k, folder in enumerate(fts):  # the extract case's fine-tunes: every projection moved, the rest as the base's
            write_fine_tune(root / "base", folder, seed=20 + k)
        ours = [sys.executable, "-m", "bench.peakwrap", "nan_peft.cli:main", "merge", "--base", str(root / "base"), *map(str, fts)]
        commands = {
            "nan-peft merge --base (task_arithmetic, weights 0.6,0.4)": (
                ours + ["-o", str(root / "nan-peft"), "--weights", ",".join(map(str, WEIGHTS)), "--force", "--quiet"], "nan-peft"),
            "nan-peft merge --base (NAN coefficients: norms pass + merge pass)": (
                ours + ["-o", str(root / "nan-peft-nan"), "--force", "--quiet"], "nan-peft-nan"),
        }
        notes = {}
        if mergekit:
            models = "".join(f"  - model: {ft}\n    parameters: {{weight: {w}}}\n" for ft, w in zip(fts, WEIGHTS))
            (root / "mergekit.yml").write_text(f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n{models}"
                                               "dtype: float32\nout_dtype: bfloat16\n")
            commands["mergekit-yaml task_arithmetic (lazy loader)"] = (
                [mergekit, "-m", "bench.peakwrap", "mergekit.scripts.run_yaml:main", str(root / "mergekit.yml"), str(root / "mergekit"),
                 "--lazy-unpickle", "--no-copy-tokenizer"], "mergekit")
        else:
            notes["mergekit"] = "not installed: skipped (pass --mergekit PYTHON, an interpreter that has it)"
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        for _ in range(params.get("repeat", 1)):
            for name, (command, output) in commands.items():
                shutil.rmtree(root / output, ignore_errors=True)
                runs[name].append(process_peak(command, cwd=ROOT))
        if mergekit:
            notes["mergekit vs nan-peft (same weights), max |difference|"] = _compare_folds(root / "nan-peft", root / "mergekit")
        entry = _process_entry(runs, {"model_bytes": size, "checkpoints": 3, "layers": layers, "output_bytes": _folder_bytes(root / "nan-peft")})
        return {**entry, "notes": notes}
    finally:
        shutil.rmtree(root, ignore_errors=True)
