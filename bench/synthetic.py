"""Synthetic inputs shaped like real ones: LoRA adapters of Llama-shaped models (in memory, as peft folders and
as peft models) and Llama-shaped base checkpoints in safetensors shards. Seeded, so that every process of a run
builds the same numbers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# The Linear layers of a Llama decoder layer: name -> (out_features, in_features) as functions of the shape.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = PROJECTIONS[:4]


@dataclass(frozen=True)
class Shape:
    """A Llama-like model: hidden size, MLP size, number of layers."""

    name: str
    hidden: int
    mlp: int
    layers: int

    def linear(self, projection: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection."""
        if projection in ATTENTION:
            return self.hidden, self.hidden
        return (self.hidden, self.mlp) if projection == "down_proj" else (self.mlp, self.hidden)

    def module(self, layer: int, projection: str) -> str:
        group = "self_attn" if projection in ATTENTION else "mlp"
        return f"model.layers.{layer}.{group}.{projection}"

    def modules(self, projections=PROJECTIONS, layers: int | None = None) -> list[tuple[str, int, int]]:
        """(module path, out, in) of every adapted module of the first `layers` layers."""
        return [(self.module(l, p), *self.linear(p)) for l in range(self.layers if layers is None else layers) for p in projections]

    def parameters(self, projections=PROJECTIONS) -> int:
        return sum(out * fan_in for _, out, fan_in in self.modules(projections))


SHAPES = {
    "llama-7b": Shape("llama-7b", 4096, 11008, 32),
    "small": Shape("small", 1024, 2816, 8),
    "fold": Shape("fold", 2048, 5632, 8),
    "tiny": Shape("tiny", 64, 160, 2),
}


def factors(shape: Shape, r: int, seed: int, projections=PROJECTIONS, layers: int | None = None, dtype=torch.float32) -> dict:
    """{module path: (A (r, in), B (out, r))}: A like peft's Kaiming init, B like a trained update (Gaussian,
    scaled so that updates have norms of a trained adapter's order); independent per seed."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for path, rows, columns in shape.modules(projections, layers):
        A = torch.empty(r, columns, dtype=torch.float32).uniform_(-1, 1, generator=generator).mul_(columns**-0.5)
        B = torch.randn(rows, r, generator=generator, dtype=torch.float32).mul_(0.01 * (1 + seed % 3))
        out[path] = (A.to(dtype), B.to(dtype))
    return out


def lora_adapters(shape: Shape, r: int, count: int = 3, projections=PROJECTIONS, layers: int | None = None, dtype=torch.float32,
                  device="cpu"):
    """`count` nan_peft.LoraAdapter objects of rank r, scale alpha / r with alpha = 2 r (peft's common choice),
    their factors resident on `device`."""
    from nan_peft.lora import LoraAdapter, LoraModule

    return [
        LoraAdapter(
            name=f"task{k}",
            source="",
            config=_config(shape, r, projections),
            modules={path: LoraModule(A.to(device), B.to(device), 2.0)
                     for path, (A, B) in factors(shape, r, 100 + k, projections, layers, dtype).items()},
        )
        for k in range(count)
    ]


def write_adapters(root: Path, shape: Shape, r: int, count: int = 3, projections=PROJECTIONS, dtype=torch.float32) -> list[Path]:
    """The same adapters as lora_adapters, written as peft folders (adapter_config.json, adapter_model.safetensors)."""
    from safetensors.torch import save_file

    folders = []
    for k in range(count):
        folder = root / f"task{k}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {}
        for path, (A, B) in factors(shape, r, 100 + k, projections, dtype=dtype).items():
            state[f"base_model.model.{path}.lora_A.weight"] = A
            state[f"base_model.model.{path}.lora_B.weight"] = B
        save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(_config(shape, r, projections), indent=1))
        folders.append(folder)
    return folders


def _config(shape: Shape, r: int, projections) -> dict:
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(projections), "bias": "none",
        "lora_dropout": 0.0, "base_model_name_or_path": f"synthetic/{shape.name}", "task_type": "CAUSAL_LM",
    }


def write_base(folder: Path, shape: Shape, dtype=torch.bfloat16, vocab: int = 32000, layers_per_shard: int = 2) -> int:
    """A LlamaForCausalLM checkpoint (config.json, safetensors shards and index) with random weights in `dtype`;
    returns its size in bytes. Values are random (incompressible, realistic for the arithmetic), never loaded whole."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    heads = max(1, shape.hidden // 128)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(7)

    def weight(*size):
        return torch.randn(*size, generator=generator).mul_(0.02).to(dtype)

    shards = -(-shape.layers // layers_per_shard)
    weight_map, total = {}, 0
    for index in range(shards):
        tensors = {}
        if index == 0:
            tensors["model.embed_tokens.weight"] = weight(vocab, shape.hidden)
        for layer in range(index * layers_per_shard, min(shape.layers, (index + 1) * layers_per_shard)):
            for projection in PROJECTIONS:
                tensors[f"{shape.module(layer, projection)}.weight"] = weight(*shape.linear(projection))
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(shape.hidden, dtype=dtype)
        if index == shards - 1:
            tensors["model.norm.weight"] = torch.ones(shape.hidden, dtype=dtype)
            tensors["lm_head.weight"] = weight(vocab, shape.hidden)
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def peft_model(shape: Shape, r: int, count: int = 3, projections=ATTENTION, layers: int = 1, device="cpu"):
    """A peft LoraModel over a bare stack of the shape's Linear layers holding the same adapters as lora_adapters
    (names task0, task1, ...). The base weights are allocated but never written, so they take no memory: peft's
    add_weighted_adapter reads only the LoRA factors."""
    from peft import LoraConfig, get_peft_model

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            attention, mlp = torch.nn.Module(), torch.nn.Module()
            for projection in projections:
                out, fan_in = shape.linear(projection)
                owner = attention if projection in ATTENTION else mlp
                owner.add_module(projection, torch.nn.Linear(fan_in, out, bias=False))
            self.self_attn, self.mlp = attention, mlp

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList(Layer() for _ in range(layers))

    with torch.device("meta"):
        base = Stack()
    base = base.to_empty(device=device)  # uninitialised: pages are never touched
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(projections), lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="task0")
    for k in range(1, count):
        model.add_adapter(f"task{k}", config)
    with torch.no_grad():
        for k in range(count):
            for path, (A, B) in factors(shape, r, 100 + k, projections, layers).items():
                layer = model.base_model.model.get_submodule(path)
                layer.lora_A[f"task{k}"].weight.copy_(A)
                layer.lora_B[f"task{k}"].weight.copy_(B)
    return model
