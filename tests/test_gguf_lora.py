"""GGUF LoRA files (nan_peft.gguf_lora) read back with gguf's own reader and compared with a reference written
from llama.cpp's source, not from the writer: tensor names from src/llama-arch.cpp (LLM_ARCH_LLAMA / QWEN2),
the q/k row order of convert_hf_to_gguf.py's LlamaModel.permute as an index formula, the shape checks of
src/llama-adapter.cpp, and the update llama.cpp applies (scale alpha / b.ne[0], llama-adapter.h; the embedding's
rows of a times b, llama-graph.cpp) against peft's own merged weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import nan_peft  # noqa: E402
from nan_peft.errors import NanPeftError  # noqa: E402
from nan_peft.gguf_lora import GGUF_NAME, read_base_config, write_gguf_lora  # noqa: E402

HEADS, KV_HEADS, HIDDEN, LAYERS, VOCAB, FF = 4, 2, 64, 2, 96, 96
HEAD_DIM = HIDDEN // HEADS
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]

# llama.cpp's names (src/llama-arch.cpp, LLM_TENSOR_NAMES) for the Hugging Face modules, LLAMA and QWEN2 alike
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "lm_head": "output",
    **{f"model.layers.{i}.self_attn.{hf}": f"blk.{i}.{cpp}" for i in range(LAYERS) for hf, cpp in
       [("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")]},
    **{f"model.layers.{i}.mlp.{hf}": f"blk.{i}.{cpp}" for i in range(LAYERS) for hf, cpp in
       [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")]},
}


def config_kwargs(tied: bool = False) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FF, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                tie_word_embeddings=tied)


def peft_adapter(folder, model_class=LlamaForCausalLM, config_class=LlamaConfig, seed=0, tied=False, **lora):
    """A real peft adapter with random factors, saved to `folder`; returns (peft model, base config.json dict)."""
    torch.manual_seed(seed)
    config = config_class(**config_kwargs(tied))
    config.architectures = [model_class.__name__]
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ALL, **lora}
    model = get_peft_model(model_class(config).eval(), LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    return model, json.loads(config.to_json_string())


def llama_cpp_rows(rows: int, heads: int) -> torch.Tensor:
    """Row i of llama.cpp's q/k weight is HF row order[i]: within each head, HF's two halves interleaved
    (convert_hf_to_gguf.py, LlamaModel.permute: reshape(heads, 2, d/2, -1).swapaxes(1, 2))."""
    d = rows // heads
    return torch.tensor([h * d + j * (d // 2) + i for h in range(heads) for i in range(d // 2) for j in range(2)])


def read_back(path):
    reader = gguf.GGUFReader(path)
    fields = {}
    for key, field in reader.fields.items():
        value = field.parts[field.data[0]] if field.data else None
        fields[key] = bytes(value).decode() if field.types and field.types[0] == gguf.GGUFValueType.STRING else value
    tensors = {t.name: (torch.from_numpy(t.data.copy()), [int(n) for n in t.shape], t.tensor_type) for t in reader.tensors}
    return fields, tensors


def peft_modules(model):
    """{HF module path: (A, B, scale)} straight from the peft model (not through nan-peft's reader)."""
    found = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            found[name] = (module.lora_A["default"].weight, module.lora_B["default"].weight, module.scaling["default"])
        elif hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
            found[name] = (module.lora_embedding_A["default"], module.lora_embedding_B["default"], module.scaling["default"])
    return found


def test_llama_factors_names_and_metadata_match_llama_cpp(tmp_path):
    model, base_config = peft_adapter(tmp_path / "adapter")
    adapter = nan_peft.read_adapter(tmp_path / "adapter")
    path = write_gguf_lora(adapter, base_config, tmp_path / "out")
    assert path == tmp_path / "out" / GGUF_NAME
    fields, tensors = read_back(path)

    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert float(fields["adapter.lora.alpha"][0]) == 4.0  # alpha = r: llama.cpp's scale alpha / r is 1

    modules = peft_modules(model)
    assert len(modules) == LAYERS * 7 + 2
    assert set(tensors) == {f"{GGUF_NAMES[p]}.weight.lora_{ab}" for p in modules for ab in "ab"}
    base = dict(model.base_model.model.named_parameters())
    for module_path, (A, B, scale) in modules.items():
        a, a_ne, a_type = tensors[f"{GGUF_NAMES[module_path]}.weight.lora_a"]
        b, b_ne, b_type = tensors[f"{GGUF_NAMES[module_path]}.weight.lora_b"]
        assert a_type == b_type == gguf.GGMLQuantizationType.F32
        expected_b = (B.detach().double() * scale).float()
        if module_path.endswith("q_proj"):
            expected_b = expected_b[llama_cpp_rows(HEADS * HEAD_DIM, HEADS)]
        if module_path.endswith("k_proj"):
            expected_b = expected_b[llama_cpp_rows(KV_HEADS * HEAD_DIM, KV_HEADS)]
        weight_ne = list(reversed(base[f"{module_path}.base_layer.weight"].shape))
        if module_path == "model.embed_tokens":
            # llama-adapter.cpp: token_embd's A and B are flipped (base ne[0] == b.ne[1], base ne[1] == a.ne[1])
            assert torch.equal(a, A.detach().T) and torch.equal(b, expected_b)
            assert weight_ne == [b_ne[1], a_ne[1]]
        else:
            assert torch.equal(a, A.detach()) and torch.equal(b, expected_b), module_path
            # llama-adapter.cpp: base ne[0] == a.ne[0], base ne[1] == b.ne[1], a.ne[1] == b.ne[0]
            assert weight_ne == [a_ne[0], b_ne[1]] and a_ne[1] == b_ne[0] == 4


def test_llama_update_equals_peft_merged_weights_in_llama_cpp_row_order(tmp_path):
    """What llama.cpp adds to each base tensor (scale alpha / b.ne[0]) is peft's own merged update, permuted as
    convert_hf_to_gguf.py permutes the base weight; the adapter here needs rank padding (a merge)."""
    model_a, base_config = peft_adapter(tmp_path / "a", seed=0, r=4, lora_alpha=8)
    model_b, _ = peft_adapter(tmp_path / "b", seed=2, r=2, lora_alpha=6, use_rslora=True,
                              target_modules=["q_proj", "k_proj", "down_proj"])
    result = nan_peft.merge_adapters([tmp_path / "a", tmp_path / "b"], coefficients="uniform")
    path = write_gguf_lora(result.adapter, base_config, tmp_path / "out")
    fields, tensors = read_back(path)
    alpha = float(fields["adapter.lora.alpha"][0])
    assert alpha == 6.0  # cat of ranks 4 + 2, one rank for all modules (the others zero-padded)

    def merged_update(model):
        base = {k: v.detach().clone() for k, v in model.base_model.model.state_dict().items() if "lora_" not in k}
        merged = model.merge_and_unload().state_dict()
        return {k.replace(".base_layer", ""): merged[k.replace(".base_layer", "")].double() - v.double() for k, v in base.items()
                if k.replace(".base_layer", "") in merged}

    update = {k: 0.5 * v for k, v in merged_update(model_a).items()}
    for k, v in merged_update(model_b).items():
        update[k] = update[k] + 0.5 * v
    for module_path, cpp in GGUF_NAMES.items():
        a, _, _ = tensors[f"{cpp}.weight.lora_a"]
        b, b_ne, _ = tensors[f"{cpp}.weight.lora_b"]
        scale = alpha / b_ne[0]  # llama-adapter.h, get_scale
        applied = scale * (a.double() @ b.double().T if cpp == "token_embd" else b.double() @ a.double())
        expected = update[f"{module_path}.weight"]
        if module_path.endswith("q_proj"):
            expected = expected[llama_cpp_rows(HEADS * HEAD_DIM, HEADS)]
        if module_path.endswith("k_proj"):
            expected = expected[llama_cpp_rows(KV_HEADS * HEAD_DIM, KV_HEADS)]
        torch.testing.assert_close(applied, expected, rtol=1e-5, atol=1e-6, msg=module_path)


def test_qwen2_is_not_permuted(tmp_path):
    model, base_config = peft_adapter(tmp_path / "adapter", Qwen2ForCausalLM, Qwen2Config,
                                      target_modules=["q_proj", "k_proj"])
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(base_config))
    adapter = nan_peft.read_adapter(tmp_path / "adapter")
    path = write_gguf_lora(adapter, read_base_config(tmp_path / "base"), tmp_path / "out")
    again = write_gguf_lora(adapter, base_config, tmp_path / "again")
    assert path.read_bytes() == again.read_bytes()  # the same merge gives the same bytes
    fields, tensors = read_back(path)
    assert fields["general.architecture"] == "qwen2"
    for module_path, (A, B, scale) in peft_modules(model).items():
        b, _, _ = tensors[f"{GGUF_NAMES[module_path]}.weight.lora_b"]
        assert torch.equal(b, (B.detach().double() * scale).float())  # convert_hf_to_gguf.py: Qwen2Model maps names only


def test_refusals(tmp_path):
    _, tied_config = peft_adapter(tmp_path / "tied", tied=True, target_modules=["q_proj", "lm_head"])
    tied = nan_peft.read_adapter(tmp_path / "tied")
    with pytest.raises(NanPeftError, match="lm_head.*ties its embeddings"):
        write_gguf_lora(tied, tied_config, tmp_path / "out")
    _, config = peft_adapter(tmp_path / "plain", target_modules=["q_proj"])
    plain = nan_peft.read_adapter(tmp_path / "plain")
    with pytest.raises(NanPeftError, match="does not handle base architecture GPT2LMHeadModel"):
        write_gguf_lora(plain, {**config, "architectures": ["GPT2LMHeadModel"]}, tmp_path / "out")
    with pytest.raises(NanPeftError, match="no config.json"):
        read_base_config(tmp_path / "plain")
    with pytest.raises(NanPeftError, match="names no architectures"):
        write_gguf_lora(plain, {k: v for k, v in config.items() if k != "architectures"}, tmp_path / "out")
    with pytest.raises(NanPeftError, match="output rows.*heads"):  # a wrong base would permute the wrong rows
        write_gguf_lora(plain, {**config, "num_attention_heads": 8, "head_dim": 16}, tmp_path / "out")
    carrying = nan_peft.read_adapter(tmp_path / "plain")
    carrying.saved["base_model.model.score.weight"] = torch.zeros(2, HIDDEN)
    with pytest.raises(NanPeftError, match="full tensor"):
        write_gguf_lora(carrying, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    write_gguf_lora(plain, config, tmp_path / "out")
    with pytest.raises(NanPeftError, match="already exists"):  # writer.publish_folder's rules
        write_gguf_lora(plain, config, tmp_path / "out")
    write_gguf_lora(plain, config, tmp_path / "out", overwrite=True, extra_files={"README.md": "x"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", GGUF_NAME]


def test_gguf_is_imported_only_when_writing():
    code = "import sys, nan_peft, nan_peft.gguf_lora; assert 'gguf' not in sys.modules, 'gguf imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
