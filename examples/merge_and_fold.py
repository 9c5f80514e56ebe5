"""Merge adapters with NAN and fold the exact merged update into the base model: a plain transformers model.

    python examples/merge_and_fold.py
"""

import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import nan_peft
from _inputs import demo_inputs


def main() -> dict:
    folder = Path(tempfile.mkdtemp(prefix="nan-peft-example-"))
    base, adapters = demo_inputs(folder)
    result = nan_peft.merge_adapters(adapters)
    result.fold_into(base, folder / "folded")  # streamed shard by shard; device_map="auto" spreads it over GPUs
    result.save_pretrained(folder / "merged")

    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        folded = AutoModelForCausalLM.from_pretrained(folder / "folded")(ids).logits
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder / "merged")(ids).logits
    print(f"folded model: {folder / 'folded'}; max |logits(folded) - logits(base + merged adapter)| = {(folded - adapter).abs().max():.2g}")
    return {"folded": folded, "adapter": adapter}


if __name__ == "__main__":
    main()
