"""The extract case: `nan-peft extract` (a LoRA of rank r from a full fine-tune) against mergekit-extract-lora
(mergekit 0.1.5: a float32 LAPACK SVD of every task vector) and against reading both checkpoints once, on a
synthetic Llama-shaped base and fine-tune (bench.synthetic.write_base, then write_fine_tune). Both extract the
7 projections of every layer (embeddings and lm_head left out, by --modules / -e) at rank r; mergekit is skipped
when it is not installed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from .synthetic import PROJECTIONS

EXCLUDED = "embed_tokens|lm_head"


def write_fine_tune(base: Path, folder: Path, seed: int = 11, rank: int = 64) -> None:
    """A fine-tune of the checkpoint `base`, tensor by tensor: each projection weight W gets tau = G1 diag(d) G2
    (rank `rank`, singular values decaying as d_i = 1 / (1 + i / 8)) plus full-rank noise of a tenth of its norm,
    ||tau||_F about 2% of ||W||_F; other tensors are copied. Shards, index and config as the base's."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for file in sorted(base.iterdir()):
        if not file.name.endswith(".safetensors"):
            shutil.copyfile(file, folder / file.name)
            continue
        tensors = {}
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                weight = handle.get_tensor(name)
                if any(f".{p}." in name for p in PROJECTIONS):
                    m, n = weight.shape
                    decay = 1.0 / (1.0 + torch.arange(rank) / 8)
                    low = (torch.randn(m, rank, generator=generator) * decay) @ torch.randn(rank, n, generator=generator)
                    noise = torch.randn(m, n, generator=generator)
                    tau = low / low.norm() + 0.1 * noise / noise.norm()
                    weight = (weight.float() + tau * (0.02 * float(weight.float().norm()))).to(weight.dtype)
                tensors[name] = weight
        save_file(tensors, folder / file.name, metadata={"format": "pt"})


def extract(params: Mapping):
    """params: base and fine_tune (checkpoint folders), scratch (a folder for outputs), r."""
    from nan_peft.extract import extract_lora
    from nan_peft.fold.checkpoint import TensorReader, read_checkpoint

    from .cases import Case

    base, fine_tune, scratch, r = Path(params["base"]), Path(params["fine_tune"]), Path(params["scratch"]), params["r"]
    outputs = {"randomized": scratch / "nan-peft", "exact": scratch / "nan-peft-exact", "mergekit": scratch / "mergekit"}

    def run_ours(truncation: str, key: str):
        return lambda: extract_lora(fine_tune, base, rank=r, modules=[f"!{EXCLUDED}"], truncation=truncation,
                                    device=params.get("device", "cpu")).save_pretrained(outputs[key], overwrite=True)

    def read_floor():
        for checkpoint in (read_checkpoint(base), read_checkpoint(fine_tune)):
            with TensorReader(checkpoint) as reader:
                for name in checkpoint.tensors:
                    reader.read(name).sum()

    contenders = {
        "read floor (both checkpoints, every tensor once)": read_floor,
        f"nan-peft extract --rank {r} (truncation auto)": run_ours("auto", "randomized"),
        f"nan-peft extract --rank {r} --truncation exact (float64 SVD)": run_ours("exact", "exact"),
    }
    setup = {}
    mergekit = bool(params.get("mergekit", True)) and importlib.util.find_spec("mergekit") is not None
    if mergekit:
        from mergekit.scripts.extract_lora import main as mergekit_main  # imported here: not in the timed calls

        arguments = ["--model", str(fine_tune), "--base-model", str(base), "--out-path", str(outputs["mergekit"]), "--max-rank", str(r),
                     "--skip-undecomposable", *(part for name in EXCLUDED.split("|") for part in ("-e", name)),
                     *(["--device", params["device"]] if params.get("device", "cpu") != "cpu" else [])]
        contenders[f"mergekit-extract-lora --max-rank {r} (float32 SVD)"] = lambda: mergekit_main.main(arguments, standalone_mode=False)
        setup[f"mergekit-extract-lora --max-rank {r} (float32 SVD)"] = lambda: shutil.rmtree(outputs["mergekit"], ignore_errors=True)

    def check() -> dict:
        """Each output's discarded norm sqrt(sum ||tau - B A||_F^2) over the extracted modules, relative to the exact one."""
        found = {key: _discarded(base, fine_tune, folder) for key, folder in outputs.items() if (folder / "adapter_model.safetensors").exists()}
        exact = found.get("exact")
        out = {f"{key} discarded / exact discarded": value / exact for key, value in found.items() if exact and key != "exact"}
        out["exact relative discarded"] = json.loads((outputs["exact"] / "extract_record.json").read_text())["relative_discarded"] if exact else None
        return out

    checkpoint = read_checkpoint(fine_tune)
    modules = [name for name in checkpoint.tensors if any(f".{p}." in name for p in PROJECTIONS)]
    info = {"model_bytes": sum(e.end - e.begin for e in checkpoint.tensors.values()), "modules": len(modules), "rank": r,
            "mergekit": "0.1.5 in this interpreter" if mergekit else "not installed here (or --mergekit none): skipped"}
    return Case(contenders, setup=setup, info=info, check=check, warmup=tuple(contenders)[:2],
                cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True))


def _discarded(base: Path, fine_tune: Path, adapter: Path) -> float:
    """sqrt(sum over the adapter's Linear modules of ||tau - B A||_F^2) in float64, tau = W_ft - W_base."""
    from safetensors.torch import load_file

    from nan_peft.fold.checkpoint import TensorReader, read_checkpoint

    state = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    total = 0.0
    with TensorReader(read_checkpoint(base)) as original, TensorReader(read_checkpoint(fine_tune)) as tuned:
        for key in sorted(k for k in state if k.endswith("lora_A.weight")):
            name = key.removeprefix("base_model.model.").replace("lora_A.", "")
            tau = tuned.read(name).double() - original.read(name).double()
            update = state[key.replace("lora_A", "lora_B")].double() @ state[key].double()
            total += float((tau - scale * update).square().sum())
    return total**0.5
