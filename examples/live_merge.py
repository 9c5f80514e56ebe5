"""Merge adapters inside a live PeftModel (like peft's add_weighted_adapter, with NAN coefficients).

    python examples/live_merge.py
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
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters[0], adapter_name=adapters[0].name)
    for path in adapters[1:]:
        model.load_adapter(path, adapter_name=path.name)

    result = nan_peft.add_nan_weighted_adapter(model, [p.name for p in adapters], "merged", combine="svd", rank=8)
    model.set_adapter("merged")
    print("coefficients:", dict(zip(result.gram.adapter_names, [round(c, 4) for c in result.coefficients.per_adapter.tolist()])))
    print(f"largest discarded norm: {max(r.relative_discarded for r in result.report):.3g} (relative)")

    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(folder / "saved", selected_adapters=["merged"])
    print(f"active adapter: {model.active_adapter}; saved to {folder / 'saved' / 'merged'}")
    return {"logits": logits, "saved": folder / "saved" / "merged", "base": base, "result": result}


if __name__ == "__main__":
    main()
