import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network

sys.path.insert(0, str(Path(__file__).parent))

from models import GPT2, LLAMA, make_adapter  # noqa: E402


@pytest.fixture(scope="session")
def llama_adapters(tmp_path_factory):
    """Four real peft adapters on tiny Llama: different ranks, rank/alpha patterns, rsLoRA, embedding LoRA,
    different module sets and layers, and very different update norms."""
    root = tmp_path_factory.mktemp("llama")
    return [
        make_adapter(root / "plain", seed=1, magnitude=0.05),
        make_adapter(root / "patterns", seed=2, magnitude=0.2, r=8, lora_alpha=16,
                     target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}),
        make_adapter(root / "rslora", seed=3, magnitude=0.1, r=6, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "k_proj", "embed_tokens"]),
        make_adapter(root / "layer1", seed=4, magnitude=0.3, r=2, lora_alpha=2,
                     target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    ]


@pytest.fixture(scope="session")
def gpt2_adapters(tmp_path_factory):
    """Real peft adapters on tiny GPT-2 (Conv1D layers, fan_in_fan_out)."""
    root = tmp_path_factory.mktemp("gpt2")
    return [
        make_adapter(root / "g1", base=GPT2, seed=5, magnitude=0.05),
        make_adapter(root / "g2", base=GPT2, seed=6, magnitude=0.2, r=8, lora_alpha=8, target_modules=["c_attn", "c_fc"]),
        make_adapter(root / "g3", base=GPT2, seed=7, magnitude=0.1, r=2, lora_alpha=8, target_modules=["c_proj", "wte"]),
    ]


__all__ = ["GPT2", "LLAMA"]
