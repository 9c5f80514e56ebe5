"""Tiny models and real peft adapters built locally from configs (no downloads)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA = "tiny-llama"
GPT2 = "tiny-gpt2"


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


BASES = {LLAMA: tiny_llama, GPT2: tiny_gpt2}


def make_adapter(folder: Path, base: str = LLAMA, seed: int = 1, magnitude: float = 0.1, dtype=None, **lora) -> Path:
    """Save a real peft LoRA adapter whose factors are random (so its update is not zero)."""
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "v_proj"] if base == LLAMA else ["c_attn"])
    if base == GPT2:
        lora.setdefault("fan_in_fan_out", True)
    model = get_peft_model(BASES[base](), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * magnitude)
    if dtype is not None:
        model = model.to(dtype)
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(folder)
    return folder


def input_ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(123))


def fine_tune(builder, folder, seed, norm, shard="100MB", rows=None):
    """A fine-tune-like checkpoint: every parameter moved by a random perturbation whose norm over the whole model
    is `norm` (rows: resize the vocabulary first, new rows appended, as resize_token_embeddings does)."""
    model = builder()
    if rows is not None:
        model.resize_token_embeddings(rows)
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    deltas = {name: torch.randn(p.shape, generator=generator) * (1 + 3 * (i % 3)) for i, (name, p) in enumerate(params.items())}
    scale = norm / math.sqrt(sum(float(d.double().square().sum()) for d in deltas.values()))
    with torch.no_grad():
        for name, p in params.items():
            p.add_(deltas[name] * scale)
    model.save_pretrained(folder, max_shard_size=shard)
    return folder
