"""`nan-peft demo`: NAN end to end on a tiny model built locally, with no downloads, in a few seconds.

Builds a tiny Llama from a config (fixed seed) and saves it to DIR/base; makes three LoRA adapters with peft's
own get_peft_model (different ranks, target modules and update magnitudes; one uses rsLoRA), saved to DIR/<name>
with base_model_name_or_path = DIR/base; merges them with NAN coefficients (exact "cat" merge) into DIR/merged,
with the merge record and model card; loads the merge with PeftModel.from_pretrained and compares its logits
with the three sources loaded together in one PeftModel, each adapter's scale multiplied by its coefficient.
"""

from __future__ import annotations

import contextlib
import copy
import shlex
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NanPeftError

SEED = 0
# name, rank, lora_alpha, rsLoRA, target modules, magnitude of the random lora_B entries
ADAPTERS = (
    ("summarise", 4, 8, False, ("q_proj", "v_proj"), 0.02),
    ("translate", 8, 4, True, ("q_proj", "k_proj", "v_proj", "o_proj"), 0.1),
    ("code", 2, 4, False, ("q_proj", "v_proj", "up_proj", "down_proj"), 0.05),
)


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    rank: int
    norm: float
    coefficient: float


@dataclass(frozen=True)
class DemoReport:
    folder: Path
    merged: Path
    rank: int
    adapters: list[DemoAdapter]
    max_abs_difference: float
    """max |logits(merged adapter) - logits(sources applied together, scales x coefficients)|"""
    max_abs_effect: float
    """max |logits(merged adapter) - logits(base model)|: the adapters do change the output"""
    command: str


def tiny_llama():
    """A 2-layer Llama with hidden size 64, initialised from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def make_adapters(base_model, base_dir: Path, folder: Path) -> list[Path]:
    """Save the ADAPTERS, made by peft's get_peft_model on copies of base_model, with deterministic random factors."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for index, (name, rank, alpha, rslora, targets, magnitude) in enumerate(ADAPTERS):
        config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base_model), config)
        generator = torch.Generator().manual_seed(SEED + 1 + index)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_A" in parameter_name:  # like peft's Kaiming-uniform start: rows of norm about 1
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
                elif "lora_B" in parameter_name:  # what training moved, by a different amount per adapter
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * magnitude)
        model.peft_config["default"].base_model_name_or_path = str(base_dir)
        model.save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


def run_demo(output: str | Path | None = None, force: bool = False, say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo in `output` (default: a new temporary folder, kept) and report what it found; `say` gets a line
    per step. Refuses a non-empty `output` unless `force`."""
    with _quiet_libraries():
        return _run(output, force, say)


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """transformers' and peft's progress bars and warnings about their own deprecations would bury the demo's output."""
    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run(output, force, say) -> DemoReport:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaForCausalLM

    from .merge import merge_adapters
    from .record import input_entries, merge_record, provenance_files

    folder = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="nan-peft-demo-"))
    if folder.exists() and not folder.is_dir():
        raise NanPeftError(f"{folder} exists and is not a folder")
    if output is not None and folder.exists() and any(folder.iterdir()) and not force:
        raise NanPeftError(f"{folder} is not empty; pass --force to write the demo into it anyway")
    folder.mkdir(parents=True, exist_ok=True)

    base_dir, merged_dir = folder / "base", folder / "merged"
    base_model = tiny_llama()
    base_model.save_pretrained(base_dir)
    say(f"built a tiny Llama ({sum(p.numel() for p in base_model.parameters()):,} parameters) in {base_dir}")
    paths = make_adapters(base_model, base_dir, folder)
    say(f"made {len(paths)} LoRA adapters with peft: {', '.join(str(p) for p in paths)}")

    result = merge_adapters(paths)
    command = ["nan-peft", "merge", *map(str, paths), "-o", str(merged_dir)]
    record = merge_record(result, input_entries(paths, result.sources), command, {"device": "cpu", "heads": "drop", "serve": None})
    result.save_pretrained(merged_dir, overwrite=force, extra_files=provenance_files(result, record, str(merged_dir)))
    say(f"merged them with NAN coefficients into {merged_dir}")

    coefficients = dict(zip(result.gram.adapter_names, result.coefficients.per_adapter.tolist()))
    ids = torch.randint(0, base_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        base_logits = base_model(ids).logits
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), merged_dir).eval()
        merged_logits = merged(ids).logits

        together = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), paths[0], adapter_name=paths[0].name)
        for path in paths[1:]:
            together.load_adapter(path, adapter_name=path.name)
        together.base_model.set_adapter([p.name for p in paths])
        for module in together.modules():
            if isinstance(module, LoraLayer):
                for name in module.scaling:
                    module.scaling[name] *= coefficients[name]
        reference_logits = together.eval()(ids).logits
    say("loaded the merge with PeftModel.from_pretrained and the sources together, scaled by the coefficients")

    rows = [
        DemoAdapter(a.name, max(a.ranks), norm, coefficients[a.name]) for a, norm in zip(result.sources, result.norms.values())
    ]
    return DemoReport(
        folder=folder,
        merged=merged_dir,
        rank=result.rank,
        adapters=rows,
        max_abs_difference=(merged_logits - reference_logits).abs().max().item(),
        max_abs_effect=(merged_logits - base_logits).abs().max().item(),
        command=shlex.join(command),
    )
