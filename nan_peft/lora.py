"""The in-memory form of a LoRA adapter: factors, scale and the shapes needed to write them back."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod

import torch

from .targeting import TASK_HEADS

# How peft names the factors in a saved state dict, by layer kind. Embedding factors carry no ".weight".
FACTOR_KEYS = {
    "linear": ("lora_A.weight", "lora_B.weight"),
    "conv": ("lora_A.weight", "lora_B.weight"),
    "embedding": ("lora_embedding_A", "lora_embedding_B"),
}
KEY_PREFIX = "base_model.model."
FACTOR_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?P<rest>\..+)?$")
"""A LoRA factor's state-dict key: the module path, the factor, and what follows (".weight", ".bias", ...)."""


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """peft's LoRA scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA (use_rslora)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


@dataclass(frozen=True)
class LoraModule:
    """One adapted module, with update dW = scale * B @ A.

    A is (r, n) and B is (m, r) as matrices: a Conv LoRA's A (r, in, *kernel) is flattened to
    (r, in * prod(kernel)) and its B (out, r, 1, ...) to (out, r); ``a_tail`` and ``b_tail`` keep the
    trailing dimensions so the factors can be written back in peft's layout. Embedding LoRA has
    A (r, num_embeddings) and B (embedding_dim, r); its weight update is dW^T.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    kind: str = "linear"
    a_tail: tuple[int, ...] = ()
    b_tail: tuple[int, ...] = ()
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def signature(self) -> tuple:
        """What two adapters must agree on to be merged at this module."""
        return (self.kind, self.B.shape[0], self.A.shape[1], self.a_tail, self.b_tail)

    def delta(self) -> torch.Tensor:
        """The dense update s * B @ A in float64 (for tests and small modules only)."""
        return self.scale * (self.B.double() @ self.A.double())

    @property
    def transposed(self) -> bool:
        """Whether the base weight holds the update transposed: Embedding, and Conv1D (fan_in_fan_out, which peft
        applies to linear layers only, whatever a conv adapter's config says)."""
        return self.kind == "embedding" or (self.kind == "linear" and self.fan_in_fan_out)

    def weight_delta(self, update: torch.Tensor) -> torch.Tensor:
        """An (m, n) update matrix in the layout of the base weight it adds to: (out, in) for Linear,
        (in, out) for Conv1D (fan_in_fan_out), (num_embeddings, dim) for Embedding, (out, in, *kernel) for Conv."""
        if self.transposed:
            return update.T
        return update.reshape(update.shape[0], *self.a_tail) if self.kind == "conv" else update

    def peft_factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reshape matrix factors of any rank to this module's peft layout."""
        A = A.reshape(A.shape[0], *self.a_tail) if self.a_tail else A
        return A, B.reshape(B.shape[0], B.shape[1], *self.b_tail)


@dataclass
class LoraAdapter:
    """A LoRA adapter read from disk: its config and one LoraModule per adapted module path."""

    name: str
    source: str
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full tensors carried verbatim by key (peft saves a targeted embedding's base weight, in case its
    vocabulary was resized): not an update, written back unchanged."""
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    """The trained full modules of peft's modules_to_save (task heads such as a classifier, or a retrained
    embedding), by state-dict key: they replace the base module and cannot be averaged."""
    digests: dict[str, str] = field(default_factory=dict)
    """sha256 of each file the adapter was read from (adapter_config.json and the weights file), hashed from
    the bytes the reader parsed; empty for an adapter not read from files."""

    @property
    def saved_modules(self) -> list[str]:
        """The modules peft wrapped to save the `saved` tensors, as modules_to_save names them: "classifier" for
        base_model.model.classifier.weight, and for a head with sub-layers (RoBERTa's classifier.dense.weight,
        classifier.out_proj.weight). Found with the config's modules_to_save and task type (reader.saved_module);
        a tensor they do not place is named by its parent module. A module inside another listed one is left
        out: wrapping the outer one saves it."""
        paths = {saved_module(key, self.config) or key.removeprefix(KEY_PREFIX).rpartition(".")[0] for key in self.saved}
        return sorted(path for path in paths if not any(path.startswith(f"{other}.") for other in paths))

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}

    @property
    def num_parameters(self) -> int:
        return sum(m.A.numel() + m.B.numel() for m in self.modules.values())


def module_from_peft(A: torch.Tensor, B: torch.Tensor, scale: float, kind: str, fan_in_fan_out: bool) -> LoraModule:
    """Build a LoraModule from factors in peft's layout (see LoraModule)."""
    return LoraModule(
        A=A.reshape(A.shape[0], prod(A.shape[1:])),
        B=B.reshape(B.shape[0], B.shape[1]) if B.dim() > 2 else B,
        scale=scale,
        kind=kind,
        a_tail=tuple(A.shape[1:]),
        b_tail=tuple(B.shape[2:]),
        fan_in_fan_out=fan_in_fan_out,
    )


def saved_module(key: str, config: Mapping) -> str | None:
    """The module of modules_to_save that holds the tensor `key`, as a path without "base_model.model.", or None.

    peft wraps every module whose path ends with a listed name (peft.utils.other._set_trainable; its task model
    classes add their head names, TASK_HEADS) and saves the wrapped module's whole state dict, so the tensor
    belongs to the outermost ancestor of its module (the module itself included) whose path ends with a name:
    "classifier" for base_model.model.classifier.weight and for a RoBERTa head's classifier.dense.weight.
    LoRA factors never belong to a saved module.
    """
    names = config.get("modules_to_save") or ()
    names = [names] if isinstance(names, str) else [name for name in names if isinstance(name, str) and name]
    names += TASK_HEADS.get(config.get("task_type"), ())
    if not names or not key.startswith(KEY_PREFIX) or FACTOR_KEY.match(key):
        return None
    parts = key.removeprefix(KEY_PREFIX).split(".")[:-1]
    for end in range(1, len(parts) + 1):
        path = ".".join(parts[:end])
        if any(path.endswith(name) for name in names):
            return path
    return None
