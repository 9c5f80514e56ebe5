"""A small in-process server that serves a base model with the adapter published at a folder, and swaps in a
newly published merge without a restart.

nan-peft publishes atomically (a complete temporary folder renamed over the old one), so the folder always holds
one complete adapter; the server also checks that the folder did not change while it was loading, so it never
mixes two versions. Run it to see a merge published, served, re-published and swapped:

    python examples/hot_swap_server.py
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

import nan_peft
from _inputs import demo_inputs


class HotSwapServer:
    """Serves `base` with the adapter at `folder`; `poll()` swaps in a newly published one."""

    def __init__(self, base: torch.nn.Module, folder: str | os.PathLike):
        self.base, self.folder = base, Path(folder)
        self.model: PeftModel | None = None
        self.loaded = None  # identity of the folder version being served
        self.swaps = 0

    def _identity(self):
        status = os.stat(self.folder)  # a new publish is a new folder: new inode and times
        return status.st_ino, status.st_mtime_ns, status.st_ctime_ns

    def poll(self) -> bool:
        """Load the published adapter if it changed since the last poll; True when a new one is now served."""
        try:
            identity = self._identity()
            if identity == self.loaded:
                return False
            name = f"v{self.swaps + 1}"
            if self.model is None:
                model = PeftModel.from_pretrained(self.base, self.folder, adapter_name=name)
            else:
                self.model.load_adapter(self.folder, adapter_name=name)
                model = self.model
            if self._identity() != identity:  # re-published while we read: drop it, the next poll retries
                raise FileNotFoundError(self.folder)
        # Not published yet, or the folder vanished or changed mid-read (peft says "can't find" with a
        # ValueError): undo this load, keep serving what was served, and retry on the next poll.
        except (OSError, ValueError, SafetensorError):
            self._undo(f"v{self.swaps + 1}")
            return False
        old = self.model.active_adapter if self.model is not None else None
        self.model = model.eval()
        self.model.set_adapter(name)
        if old is not None:
            self.model.delete_adapter(old)
        self.loaded, self.swaps = identity, self.swaps + 1
        return True

    def _undo(self, name: str) -> None:
        """Remove a load that did not complete. peft injects LoRA layers into the base model itself, so a first
        load is undone by putting every base layer back (the base must never serve a discarded adapter)."""
        if self.model is not None:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            return
        for path, module in list(self.base.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, attribute = path.rpartition(".")
                setattr(self.base.get_submodule(parent), attribute, module.get_base_layer())

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the currently served adapter (the base model until one is published)."""
        return (self.model or self.base)(input_ids).logits


def main() -> dict:
    folder = Path(tempfile.mkdtemp(prefix="nan-peft-example-"))
    base, adapters = demo_inputs(folder)
    served = folder / "served"
    server = HotSwapServer(AutoModelForCausalLM.from_pretrained(base).eval(), served)
    ids = torch.arange(8).reshape(1, 8)

    nan_peft.merge_adapters(adapters).save_pretrained(served)  # publish a NAN merge
    server.poll()
    first = server(ids)
    nan_peft.merge_adapters(adapters, coefficients="uniform").save_pretrained(served, overwrite=True)  # re-publish
    swapped = server.poll()
    second = server(ids)
    print(f"served {served}: swapped={swapped}, swaps={server.swaps}, logits moved by {(second - first).abs().max():.3g}")
    return {"first": first, "second": second, "swaps": server.swaps}


if __name__ == "__main__":
    main()
