"""Reading PEFT adapters: every supported variant equals peft's own update; every refusal says why."""

import json
import shutil

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from models import GPT2, LLAMA, make_adapter, tiny_llama
from nan_peft import NanPeftError, read_adapter, read_adapters
from oracle import load_sources, peft_deltas


def assert_matches_peft(base, paths):
    deltas = peft_deltas(load_sources(base, paths))
    for i, path in enumerate(paths):
        adapter = read_adapter(path)
        expected = {m: d[f"s{i}"] for m, d in deltas.items() if f"s{i}" in d}
        assert set(adapter.modules) == set(expected)
        for module, delta in expected.items():
            torch.testing.assert_close(adapter.modules[module].delta(), delta, rtol=1e-5, atol=1e-7)


def test_llama_variants_equal_peft_updates(llama_adapters):
    """rank_pattern, alpha_pattern, rsLoRA, embedding LoRA and layers_to_transform."""
    assert_matches_peft(LLAMA, llama_adapters)
    patterns = read_adapter(llama_adapters[1])
    assert patterns.modules["model.layers.0.self_attn.v_proj"].rank == 2
    assert patterns.modules["model.layers.1.self_attn.q_proj"].scale == 3 / 8
    assert patterns.modules["model.layers.0.self_attn.q_proj"].scale == 2.0
    assert read_adapter(llama_adapters[2]).modules["model.layers.0.self_attn.q_proj"].scale == pytest.approx(4 / 6**0.5)
    assert set(read_adapter(llama_adapters[3]).modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}


def test_gpt2_conv1d_and_embedding_equal_peft_updates(gpt2_adapters):
    assert_matches_peft(GPT2, gpt2_adapters)
    module = read_adapter(gpt2_adapters[0]).modules["transformer.h.0.attn.c_attn"]
    assert module.fan_in_fan_out and module.B.shape == (96, 4) and module.A.shape == (4, 32)


class TinyConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Conv2d(8, 4, kernel_size=1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def make_conv_adapter(folder, seed, magnitude, r=4, **lora):
    model = get_peft_model(TinyConv(), LoraConfig(r=r, lora_alpha=4, target_modules=["conv", "head"], **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * magnitude)
    model.save_pretrained(folder)
    return folder


def test_conv2d_lora_equals_peft_update(tmp_path):
    paths = [make_conv_adapter(tmp_path / "c1", 1, 0.1), make_conv_adapter(tmp_path / "c2", 2, 0.3, r=2)]
    from peft import PeftModel

    model = PeftModel.from_pretrained(TinyConv(), paths[0], adapter_name="s0")
    model.load_adapter(paths[1], adapter_name="s1")
    deltas = peft_deltas(model)
    for i, path in enumerate(paths):
        adapter = read_adapter(path)
        conv = adapter.modules["conv"]
        assert conv.kind == "conv" and conv.a_tail == (3, 3, 3) and conv.b_tail == (1, 1)
        for module in ("conv", "head"):
            torch.testing.assert_close(adapter.modules[module].delta(), deltas[module][f"s{i}"], rtol=1e-5, atol=1e-7)


def test_conv_update_is_never_transposed(tmp_path):
    """peft ignores fan_in_fan_out for conv layers (and saves it as given): the update keeps the conv weight's
    layout, even for a square 1x1 kernel where a transposed one would fit."""
    from peft import PeftModel

    path = make_conv_adapter(tmp_path / "c", 3, 0.2, fan_in_fan_out=True)
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = PeftModel.from_pretrained(TinyConv(), path)
    adapter = read_adapter(path)
    for name in ("conv", "head"):
        module = adapter.modules[name]
        expected = model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        torch.testing.assert_close(module.weight_delta(module.delta()), expected, rtol=1e-5, atol=1e-7)


def test_bin_adapter_reads_like_safetensors(llama_adapters, tmp_path):
    source = llama_adapters[0]
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(source / "adapter_config.json", folder)
    torch.save(load_file(source / "adapter_model.safetensors"), folder / "adapter_model.bin")
    a, b = read_adapter(source), read_adapter(folder)
    for module in a.modules:
        assert torch.equal(a.modules[module].A, b.modules[module].A) and torch.equal(a.modules[module].B, b.modules[module].B)


def test_bin_with_code_is_refused(tmp_path, llama_adapters):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(llama_adapters[0] / "adapter_config.json", folder)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Boom()}, folder / "adapter_model.bin")
    with pytest.raises(NanPeftError, match="adapter_model.bin is unreadable or not plain tensors"):
        read_adapter(folder)


def edited(source, tmp_path, name, config=None, tensors=None):
    """A copy of an adapter with its config updated and/or its tensors transformed."""
    folder = tmp_path / name
    shutil.copytree(source, folder)
    if config:
        data = json.loads((folder / "adapter_config.json").read_text())
        data.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if tensors:
        state = load_file(folder / "adapter_model.safetensors")
        save_file(tensors(state), folder / "adapter_model.safetensors")
    return folder


def first_b(state, value):
    key = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
    state[key] = torch.full_like(state[key], value) if value is not None else state[key]
    return state


@pytest.mark.parametrize(
    "config,message",
    [
        ({"use_dora": True}, "DoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "trained biases"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"init_lora_weights": "olora"}, "modified base model"),
        ({"use_qalora": True}, "QA-LoRA"),
        ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
        ({"r": 8}, "has rank 4 but adapter_config.json says r=8"),
        ({"rank_pattern": {"q_proj": 2}}, "q_proj has rank 4 but adapter_config.json says r=2"),
        ({"lora_alpha": 0}, "lora_alpha=0"),
    ],
)
def test_config_refusals(llama_adapters, tmp_path, config, message):
    folder = edited(llama_adapters[0], tmp_path, "bad", config=config)
    with pytest.raises(NanPeftError, match=message) as error:
        read_adapter(folder)
    assert str(folder) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "transform,message",
    [
        (lambda s: first_b(s, float("nan")), "NaN or Inf"),
        (lambda s: first_b(s, float("inf")), "NaN or Inf"),
        (lambda s: {**s, "base_model.model.model.norm.weight": torch.ones(32)}, "unexpected tensor"),
        (lambda s: {k: v for k, v in s.items() if not k.endswith("q_proj.lora_A.weight")}, "expected both lora_A and lora_B"),
        (lambda s: {k: (v[:, :3].contiguous() if k.endswith("layers.0.self_attn.q_proj.lora_B.weight") else v) for k, v in s.items()}, "lora_B must be"),
    ],
)
def test_weight_refusals(llama_adapters, tmp_path, transform, message):
    folder = edited(llama_adapters[0], tmp_path, "bad", tensors=transform)
    with pytest.raises(NanPeftError, match=message):
        read_adapter(folder)


def test_non_lora_peft_adapter_refused(tmp_path):
    model = get_peft_model(tiny_llama(), IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(NanPeftError, match="peft_type is 'IA3'"):
        read_adapter(tmp_path / "ia3")


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f / "adapter_config.json").unlink(), "missing adapter_config.json"),
    (lambda f: (f / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda f: (f / "adapter_model.safetensors").unlink(), "missing adapter_model.safetensors"),
    (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00" * 5), "unreadable"),
])
def test_broken_folders(llama_adapters, tmp_path, damage, message):
    folder = edited(llama_adapters[0], tmp_path, "broken")
    damage(folder)
    with pytest.raises(NanPeftError, match=message):
        read_adapter(folder)


def test_missing_folder():
    with pytest.raises(NanPeftError, match="no such folder"):
        read_adapter("/nonexistent/adapter")


def test_different_bases_refused_unless_allowed(llama_adapters, tmp_path):
    other = edited(llama_adapters[1], tmp_path, "other", config={"base_model_name_or_path": "another-model"})
    with pytest.raises(NanPeftError, match="different base models"):
        read_adapters([llama_adapters[0], other])
    assert len(read_adapters([llama_adapters[0], other], allow_different_bases=True)) == 2


def test_incompatible_module_shapes_refused(llama_adapters, tmp_path):
    """Same module path, different in/out features: a different model that claims the same base."""
    from peft import LoraConfig as Config
    from transformers import LlamaConfig, LlamaForCausalLM

    wide = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    model = get_peft_model(wide, Config(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.peft_config["default"].base_model_name_or_path = LLAMA
    model.save_pretrained(tmp_path / "wide")
    with pytest.raises(NanPeftError, match=r"model.layers.0.self_attn.q_proj has incompatible shapes: linear 32x32 in plain, linear 64x64 in wide"):
        read_adapters([llama_adapters[0], tmp_path / "wide"])


def test_same_folder_twice_gets_distinct_names(llama_adapters):
    names = [a.name for a in read_adapters([llama_adapters[0], llama_adapters[0]], allow_duplicates=True)]
    assert names == ["plain", "plain#2"]


def test_embedding_base_weight_is_carried(llama_adapters):
    adapter = read_adapter(llama_adapters[2])
    assert list(adapter.extras) == ["base_model.model.model.embed_tokens.base_layer.weight"]
    assert torch.equal(adapter.extras["base_model.model.model.embed_tokens.base_layer.weight"], tiny_llama().model.embed_tokens.weight)


def test_bf16_adapter_keeps_dtype(tmp_path):
    adapter = read_adapter(make_adapter(tmp_path / "bf16", seed=3, dtype=torch.bfloat16))
    assert {m.A.dtype for m in adapter.modules.values()} == {torch.bfloat16}


def test_weight_delta_has_the_base_weight_layout(llama_adapters, gpt2_adapters, tmp_path):
    """weight_delta(s B A) equals peft's get_delta_weight, which is laid out like the base weight."""
    from oracle import lora_layers

    conv = [make_conv_adapter(tmp_path / "c", 1, 0.1)]
    from peft import PeftModel

    cases = [(load_sources(LLAMA, llama_adapters[2:3]), llama_adapters[2]), (load_sources(GPT2, gpt2_adapters[2:3]), gpt2_adapters[2]),
             (PeftModel.from_pretrained(TinyConv(), conv[0], adapter_name="s0"), conv[0])]
    for model, path in cases:
        adapter = read_adapter(path)
        for module, layer in lora_layers(model).items():
            expected = layer.get_delta_weight("s0")
            got = adapter.modules[module].weight_delta(adapter.modules[module].delta())
            assert got.shape == layer.get_base_layer().weight.shape
            torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-7)


def test_hub_id_offline_fails_in_one_line(monkeypatch):
    """A Hub id is fetched through huggingface_hub; offline (as in these tests) that is a clear one-line error."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(NanPeftError, match=r"^someone/some-adapter: no such folder, and fetching it from the Hub failed \(\w+\)$"):
        read_adapter("someone/some-adapter")


def test_mica_adapter_equals_peft_update(tmp_path):
    """MiCA (init_lora_weights="mica") sets B from the base's SVD and A to zero and leaves the base as it is:
    its update on the unchanged base is s*B@A, which peft computes too."""
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="mica"))
    unchanged = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(unchanged[k], v) for k, v in before.items())
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name:  # MiCA trains A only
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(tmp_path / "mica")
    assert json.loads((tmp_path / "mica" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"
    assert_matches_peft(LLAMA, [tmp_path / "mica"])
    assert len(read_adapter(tmp_path / "mica").modules) == 4


def test_saved_module_follows_peft_matching():
    """A tensor belongs to the outermost module whose path ends with a modules_to_save name (peft's
    _set_trainable rule), or a head peft's task class adds; LoRA factors never do."""
    from nan_peft.reader import saved_module

    config = {"modules_to_save": ["classifier", "head"]}
    assert saved_module("base_model.model.classifier.dense.weight", config) == "classifier"
    assert saved_module("base_model.model.classifier.weight", config) == "classifier"
    assert saved_module("base_model.model.lm_head.weight", config) == "lm_head"  # peft wraps lm_head for "head"
    assert saved_module("base_model.model.model.norm.weight", config) is None
    assert saved_module("base_model.model.classifier.lora_A.weight", config) is None
    assert saved_module("base_model.model.score.weight", {"task_type": "SEQ_CLS"}) == "score"
    assert saved_module("base_model.model.score.weight", {"task_type": "CAUSAL_LM"}) is None
