"""Inputs for the examples when none are given: the demo's tiny Llama and its three peft adapters."""

from pathlib import Path

from nan_peft.demo import make_adapters, tiny_llama


def demo_inputs(folder: Path) -> tuple[Path, list[Path]]:
    """Save the tiny base model to folder/base and three LoRA adapters beside it; return (base, adapters)."""
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    return folder / "base", make_adapters(base, folder / "base", folder)
