"""Folding merged updates into base models, against independent references: peft's own get_delta_weight for
the weights, peft's forward pass (unmerged and merge_and_unload) for the logits, and a plain copy for the rest."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Model, LlamaConfig, LlamaForCausalLM

import nan_peft.fold as fold
from models import GPT2, LLAMA, input_ids, tiny_gpt2, tiny_llama
from nan_peft import NanPeftError, merge_adapters
from nan_peft.fold import fold_into, parse_max_memory, resolve_tensor
from nan_peft.rules import RULES
from oracle import lora_layers

TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}\n', "special_tokens_map.json": '{"eos_token": "<eos>"}\n'}


def tied_llama() -> LlamaForCausalLM:
    """tiny_llama with tie_word_embeddings: the same weights, lm_head shared with embed_tokens."""
    untied = tiny_llama()
    model = LlamaForCausalLM(LlamaConfig(**{**untied.config.to_dict(), "tie_word_embeddings": True})).eval()
    model.load_state_dict({k: v for k, v in untied.state_dict().items() if k != "lm_head.weight"}, strict=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def save_base(model, folder, shard="40KB"):
    model.save_pretrained(folder, max_shard_size=shard)
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    return folder


BUILDERS = {  # case: (base name in the adapters, model builder, adapters fixture)
    "gpt2": (GPT2, tiny_gpt2, "gpt2_adapters"),
    "llama": (LLAMA, tiny_llama, "llama_adapters"),
    "llama_tied": (LLAMA, tied_llama, "llama_adapters"),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {name: save_base(builder(), root / name) for name, (_, builder, _) in BUILDERS.items()}


def tensors(folder):
    """Every tensor in the folder's safetensors files, by name."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                assert key not in out
                out[key] = handle.get_tensor(key)
    return out


def peft_weight_deltas(base_folder, sources, result, rule=None, **options):
    """{weight name: merged update in the weight's layout}, from peft's get_delta_weight of each source adapter
    (not from nan-peft's factors): sum_k c_k dW_k, or `rule` applied to the stacked dW_k."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), sources[0], adapter_name="s0")
    for k, source in enumerate(sources[1:], 1):
        model.load_adapter(source, adapter_name=f"s{k}")
    coefficients = result.coefficients
    deltas = {}
    for path, layer in lora_layers(model).items():
        c = coefficients.values[coefficients.modules.index(path)]
        names = sorted((set(layer.lora_A) | set(layer.lora_embedding_A)) - {"default"})
        terms = [(float(c[int(n[1:])]), layer.get_delta_weight(n).detach().double()) for n in names if c[int(n[1:])] != 0]
        if rule is None:
            deltas[f"{path}.weight"] = sum(w * d for w, d in terms)
        else:
            stacked = torch.stack([d for _, d in terms])
            deltas[f"{path}.weight"] = RULES[rule](stacked, torch.tensor([w for w, _ in terms], dtype=torch.float64), None, **options)
    return deltas


def logits(model):
    with torch.no_grad():
        return model(input_ids()).logits


def check_weights(base, folded, deltas, untied=()):
    """Folded = (W.float() + delta.float()).to(W.dtype) where an update lands; untouched tensors equal; split tied
    weights equal the base's shared one."""
    assert set(folded) == set(base) | set(untied)
    for name, weight in folded.items():
        original = base[untied[name]] if name in untied else base[name]
        assert weight.dtype == original.dtype and weight.shape == original.shape, name
        if name in deltas:
            expected = (original.float() + deltas[name].float()).to(original.dtype)
            torch.testing.assert_close(weight, expected, rtol=1e-5, atol=1e-6, msg=name)
            assert not torch.equal(weight, original), name
        else:
            assert torch.equal(weight, original), name


def check_files(base_folder, out, untie):
    """Non-weight files copied unchanged; config unchanged but for tie_word_embeddings; the index covers every tensor."""
    for name in [*TOKENIZER, "generation_config.json"]:
        assert (out / name).read_bytes() == (base_folder / name).read_bytes()
    config, base_config = json.loads((out / "config.json").read_text()), json.loads((base_folder / "config.json").read_text())
    assert config == ({**base_config, "tie_word_embeddings": False} if untie else base_config)
    index_file = out / "model.safetensors.index.json"
    if index_file.exists():
        index = json.loads(index_file.read_text())
        stored = {}
        for file in out.glob("*.safetensors"):
            with safe_open(file, framework="pt") as handle:
                stored.update(dict.fromkeys(handle.keys(), file.name))
        assert index["weight_map"] == stored
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors(out).values())


@pytest.mark.parametrize("case", ["gpt2", "llama", "llama_tied"])
def test_fold_equals_base_plus_update_and_peft(case, bases, tmp_path, request):
    """GPT-2: Conv1D, tied wte with an embedding LoRA. Llama: embed_tokens LoRA (rsLoRA, patterns), untied and tied."""
    _, builder, fixture = BUILDERS[case]
    sources = request.getfixturevalue(fixture)
    base_folder = bases[case]
    result = merge_adapters(sources, combine="cat", granularity="module")
    out = fold_into(result, base_folder, tmp_path / "folded")
    placed = fold_into(result, base_folder, tmp_path / "placed", device_map="cpu")

    embedding = "transformer.wte.weight" if case == "gpt2" else "model.embed_tokens.weight"
    untied = {"lm_head.weight": embedding} if case != "llama" else {}
    base, folded = tensors(base_folder), tensors(out)
    deltas = peft_weight_deltas(base_folder, sources, result)
    assert embedding in deltas  # the case really folds an embedding update
    check_weights(base, folded, deltas, untied)
    check_files(base_folder, out, untie=bool(untied))
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base_folder.glob("*.safetensors"))
    assert len(list(out.glob("*.safetensors"))) > 1

    by_placement = tensors(placed)  # same tensors (saved by transformers, possibly sharded otherwise)
    assert by_placement.keys() == folded.keys() and all(torch.equal(by_placement[k], folded[k]) for k in folded)
    check_files(base_folder, placed, untie=bool(untied))

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    if untied:
        assert model.lm_head.weight is not model.get_input_embeddings().weight
    result.save_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path / "merged").eval()
    ours, reference = logits(model), logits(adapted)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(placed).eval()), ours, rtol=0, atol=0)
    assert (reference - logits(builder())).abs().max() > 1e-2  # the update really changes the output

    merged = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path / "merged").merge_and_unload())
    if not untied:
        torch.testing.assert_close(ours, merged, rtol=1e-4, atol=1e-5)
    else:
        # peft merges the embedding update into the tensor lm_head shares: the output layer changes too, unlike
        # the unmerged adapter. Untied by hand first (peft's advice), its merge equals our fold.
        assert (merged - reference).abs().max() > 1e-2
        by_hand = AutoModelForCausalLM.from_pretrained(base_folder, tie_word_embeddings=False)
        by_hand.lm_head.weight = torch.nn.Parameter(by_hand.get_input_embeddings().weight.detach().clone())
        by_hand = PeftModel.from_pretrained(by_hand, tmp_path / "merged").merge_and_unload()
        torch.testing.assert_close(ours, logits(by_hand), rtol=1e-4, atol=1e-5)


def test_ties_fold_is_the_dense_rule_untruncated(bases, llama_adapters, tmp_path):
    """TIES exists only densely: the fold adds the exact rule output (the adapter at full rank 32 equals it)."""
    result = merge_adapters(llama_adapters, method="ties", density=0.5, combine="svd", rank=32)
    out = fold_into(result, bases["llama"], tmp_path / "folded")
    deltas = peft_weight_deltas(bases["llama"], llama_adapters, result, rule="ties", density=0.5)
    check_weights(tensors(bases["llama"]), tensors(out), deltas)
    result.save_pretrained(tmp_path / "merged")
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases["llama"]), tmp_path / "merged").eval()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), logits(adapted), rtol=1e-4, atol=1e-5)


def test_bf16_base_stays_bf16_on_both_paths(llama_adapters, tmp_path):
    base_folder = save_base(tiny_llama().to(torch.bfloat16), tmp_path / "base")
    result = merge_adapters(llama_adapters[:2], coefficients=[0.7, 0.3])
    out = fold_into(result, base_folder, tmp_path / "folded")
    placed = fold_into(result, base_folder, tmp_path / "placed", device_map={"": "cpu"})
    base, folded, by_placement = tensors(base_folder), tensors(out), tensors(placed)
    assert {t.dtype for t in folded.values()} == {torch.bfloat16}
    assert by_placement.keys() == folded.keys() and all(torch.equal(by_placement[k], folded[k]) for k in folded)
    deltas = peft_weight_deltas(base_folder, llama_adapters[:2], result)
    for name, weight in folded.items():
        if name in deltas:  # one cast from float32: at most one bf16 rounding step from the reference
            torch.testing.assert_close(weight, (base[name].float() + deltas[name].float()).to(torch.bfloat16))
        else:
            assert torch.equal(weight, base[name])
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("rule", [dict(method="dare_linear", density=0.5, seed=3, combine="svd", rank=8), dict(scale=0.5)])
def test_single_file_model_and_rule_options(gpt2_adapters, tmp_path, rule):
    base_folder = tmp_path / "base"
    tiny_gpt2().save_pretrained(base_folder)
    result = merge_adapters(gpt2_adapters, **rule)
    out = fold_into(result, base_folder, tmp_path / "folded")
    placed = fold_into(result, base_folder, tmp_path / "placed", device_map="cpu")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    folded, by_placement = tensors(out), tensors(placed)
    assert all(torch.equal(by_placement[k], folded[k]) for k in folded)  # DARE: the same seeded masks
    if "method" not in rule:
        check_weights(tensors(base_folder), folded, {k: 0.5 * d for k, d in peft_weight_deltas(base_folder, gpt2_adapters, result).items()},
                      {"lm_head.weight": "transformer.wte.weight"})


@pytest.mark.parametrize("targets", [["attn.c_proj", "lm_head"], ["c_attn", "lm_head"]])
def test_conv1d_layout_comes_from_the_base_not_the_config(targets, tmp_path):
    """peft decides fan_in_fan_out per layer type (Conv1D: true, Linear: false) and saves whatever the last layer
    left in the config: false here, for an adapter on GPT-2's Conv1D layers and its Linear lm_head. The fold lays
    each update out as its base weight is (a square c_proj would otherwise be added untransposed, silently)."""
    from models import make_adapter

    adapter = make_adapter(tmp_path / "adapter", base=GPT2, seed=11, magnitude=0.2, target_modules=targets)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    base_folder = save_base(tiny_gpt2(), tmp_path / "base")
    result = merge_adapters([adapter])
    deltas = peft_weight_deltas(base_folder, [adapter], result)
    assert any(name.startswith("transformer.h.") for name in deltas) and "lm_head.weight" in deltas
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter).eval()
    for out in (fold_into(result, base_folder, tmp_path / "folded"), fold_into(result, base_folder, tmp_path / "placed", device_map="cpu")):
        check_weights(tensors(base_folder), tensors(out), deltas, {"lm_head.weight": "transformer.wte.weight"})
        torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(reference), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change, message", [("mixed dtypes", "turns model.embed_tokens.weight from BF16 96x32 into F32"),
                                             ("tensor the class lacks", "leaves out the tensor model.layers.2.eh_proj.weight:")])
def test_placed_path_refuses_what_transformers_would_change(change, message, llama_adapters, tmp_path):
    """transformers loads one dtype for a whole model and drops tensors its class does not hold (an extra
    prediction layer, an old inv_freq buffer): the device-map path refuses such a base, writing nothing; the
    streaming path writes every tensor as stored."""
    state = {k: v.detach().clone().contiguous() for k, v in tiny_llama().state_dict().items()}
    if change == "mixed dtypes":
        state = {k: v if k == "lm_head.weight" else v.to(torch.bfloat16) for k, v in state.items()}
    else:
        state["model.layers.2.eh_proj.weight"] = torch.randn(32, 64)
    base_folder = tmp_path / "base"
    base_folder.mkdir()
    save_file(state, base_folder / "model.safetensors", metadata={"format": "pt"})
    (base_folder / "config.json").write_text(json.dumps(tiny_llama().config.to_dict()))
    result = merge_adapters(llama_adapters[:2])
    with pytest.raises(NanPeftError, match=message):
        fold_into(result, base_folder, tmp_path / "placed", device_map="cpu")
    assert not (tmp_path / "placed").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]
    streamed = tensors(fold_into(result, base_folder, tmp_path / "streamed"))
    assert streamed.keys() == state.keys() and all(streamed[k].dtype == v.dtype for k, v in state.items())


def test_checkpoint_in_a_layout_transformers_renames_on_loading(tmp_path):
    """A Llava checkpoint stores language_model.model.*; the model class (and so peft's module paths) names those
    tensors model.language_model.*. The fold finds them through transformers' own renaming, writes the
    checkpoint's names, and unties the text model's tied embedding it changes."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=95, tie_word_embeddings=True)).eval()
    base_folder = tmp_path / "base"
    model.save_pretrained(base_folder)
    assert "language_model.model.embed_tokens.weight" in tensors(base_folder)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    result = merge_adapters([tmp_path / "adapter"])
    reference = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(base_folder), tmp_path / "adapter").eval()
    expected = logits(reference)
    assert (expected - logits(LlavaForConditionalGeneration.from_pretrained(base_folder).eval())).abs().max() > 1e-2
    streamed = fold_into(result, base_folder, tmp_path / "streamed")
    assert set(tensors(streamed)) == set(tensors(base_folder)) | {"lm_head.weight"}
    for out in (streamed, fold_into(result, base_folder, tmp_path / "placed", device_map="cpu")):
        torch.testing.assert_close(logits(LlavaForConditionalGeneration.from_pretrained(out).eval()), expected, rtol=1e-4, atol=1e-5)


def test_checkpoint_of_a_bare_base_class(gpt2_adapters, tmp_path):
    """GPT2Model checkpoints name tensors h.0...; the adapters name modules transformer.h.0...: matched by suffix."""
    lm = tiny_gpt2()
    base_folder = tmp_path / "bare"
    lm.transformer.save_pretrained(base_folder, max_shard_size="50KB")
    result = merge_adapters(gpt2_adapters)
    out = fold_into(result, base_folder, tmp_path / "folded")
    deltas = peft_weight_deltas(save_base(lm, tmp_path / "lm"), gpt2_adapters, result)
    check_weights(tensors(base_folder), tensors(out), {k.removeprefix("transformer."): d for k, d in deltas.items()})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True  # GPT2Model ties nothing
    assert isinstance(GPT2Model.from_pretrained(out), GPT2Model)


def test_adapter_saved_with_ensure_weight_tying(bases, tmp_path):
    """peft's ensure_weight_tying applies the embedding LoRA to the tied lm_head too, saved as its own Linear LoRA:
    the fold writes the two weights apart, each with its update, and matches peft's forward of that adapter."""
    base_folder = bases["llama_tied"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), config)
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    result = merge_adapters([tmp_path / "adapter"])
    assert {"lm_head", "model.embed_tokens"} <= set(result.adapter.modules)
    out = fold_into(result, base_folder, tmp_path / "folded")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out).eval()), logits(reference), rtol=1e-4, atol=1e-5)


def test_resolve_tensor():
    names = {"h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_proj.weight", "x.layers.0.q.weight"}
    assert resolve_tensor("h.0.attn.c_proj", names) == "h.0.attn.c_proj.weight"
    assert resolve_tensor("transformer.h.0.attn.c_proj", names) == "h.0.attn.c_proj.weight"
    assert resolve_tensor("layers.0.q", names) == "x.layers.0.q.weight"
    with pytest.raises(NanPeftError, match="no tensor for module transformer.h.1.attn.c_attn"):
        resolve_tensor("transformer.h.1.attn.c_attn", names)
    with pytest.raises(NanPeftError, match="matches several base tensors"):
        resolve_tensor("layers.0.q", names | {"y.layers.0.q.weight"})


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    for bad in ("", "0:20GiB", "=3GB", "cpu="):
        with pytest.raises(NanPeftError, match="max-memory"):
            parse_max_memory(bad)


@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")
def test_cpu_offloaded_weights_are_folded_in_place(bases, llama_adapters, gpt2_adapters, tmp_path, monkeypatch):
    """Weights accelerate keeps on the CPU while the model runs on GPUs are meta tensors in the model; the update
    goes into accelerate's CPU copy, which save_pretrained writes. Simulated here with accelerate.cpu_offload."""
    from accelerate import cpu_offload

    load = fold.load_placed

    def offloaded(plan, device_map, max_memory):
        model = load(plan, device_map, max_memory)
        cpu_offload(model, execution_device=torch.device("cpu"))
        model.hf_device_map = {"": "cpu"}
        assert all(p.device.type == "meta" for p in model.parameters())
        return model

    monkeypatch.setattr(fold, "load_placed", offloaded)
    result = merge_adapters(llama_adapters)
    placed = fold_into(result, bases["llama"], tmp_path / "placed", device_map="cpu")
    streamed = fold_into(result, bases["llama"], tmp_path / "streamed")
    folded, by_placement = tensors(streamed), tensors(placed)
    assert by_placement.keys() == folded.keys() and all(torch.equal(by_placement[k], folded[k]) for k in folded)
    with pytest.raises(NanPeftError, match="tied weights .* are offloaded"):
        fold_into(merge_adapters(gpt2_adapters), bases["gpt2"], tmp_path / "refused", device_map="cpu")
    assert not (tmp_path / "refused").exists()


def test_disk_offload_is_refused(bases, gpt2_adapters, tmp_path):
    result = merge_adapters(gpt2_adapters)
    with pytest.raises(NanPeftError, match="offloads weights to disk"):
        fold_into(result, bases["gpt2"], tmp_path / "out", device_map={"": "disk"})
    with pytest.raises(NanPeftError, match="offloads weights to disk"):
        fold_into(result, bases["gpt2"], tmp_path / "out", device_map="auto", max_memory={"cpu": "30KB"})
    assert list(tmp_path.iterdir()) == []


def broken_copy(bases, name, folder):
    shutil.copytree(bases[name], folder)
    return folder


def test_bad_inputs(bases, llama_adapters, gpt2_adapters, tmp_path):
    result = merge_adapters(llama_adapters)
    out = tmp_path / "out"

    wider = save_base(LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), "intermediate_size": 64})), tmp_path / "wider")
    shapes = r"module model.layers.0.mlp.up_proj: the base tensor model.layers.0.mlp.up_proj.weight has shape 64x32 but the adapters' update is 48x32"
    with pytest.raises(NanPeftError, match=shapes):
        fold_into(result, wider, out)
    with pytest.raises(NanPeftError, match="the base model has no tensor for module transformer.h.0.attn.c_attn"):
        fold_into(merge_adapters(gpt2_adapters), bases["llama"], out)

    missing = broken_copy(bases, "llama", tmp_path / "missing")
    shard = sorted(missing.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(NanPeftError, match=f"shard {shard.name} listed in model.safetensors.index.json is missing"):
        fold_into(result, missing, out)

    truncated = broken_copy(bases, "llama", tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(NanPeftError, match="lies past the end of the file"):
        fold_into(result, truncated, out)

    torch.manual_seed(1)
    retrained = save_base(LlamaForCausalLM(tiny_llama().config), tmp_path / "other-embedding")
    with pytest.raises(NanPeftError, match="carry a full weight for model.embed_tokens .* differs from the base"):
        fold_into(result, retrained, out)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(bases["llama"] / "config.json", pickled)
    torch.save(tiny_llama().state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(NanPeftError, match="no model.safetensors .*found pytorch_model.bin.*needs safetensors"):
        fold_into(result, pickled, out)

    with pytest.raises(NanPeftError, match="no such folder"):
        fold_into(result, tmp_path / "nowhere", out)
    with pytest.raises(NanPeftError, match="is the base model's folder"):
        fold_into(result, bases["llama"], bases["llama"], overwrite=True)
    assert not out.exists()


def test_existing_output_needs_overwrite(bases, llama_adapters, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = merge_adapters(llama_adapters)
    with pytest.raises(NanPeftError, match="already exists"):
        fold_into(result, bases["llama"], out)
    with pytest.raises(NanPeftError, match="already exists"):
        fold_into(result, bases["llama"], out, device_map="cpu")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    fold_into(result, bases["llama"], out, overwrite=True, extra_files={"README.md": "folded\n"})
    assert not (out / "keep.txt").exists() and (out / "README.md").read_text() == "folded\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


# ----------------------------------------------------------------------------------------------------------
# Peak memory of the streaming path, in a fresh interpreter

PEAK = r"""
import json, os, resource, sys
import transformers
transformers.LlamaForCausalLM  # the fold imports it (tied weights): ~130 MiB of code, not the fold's data
from nan_peft import merge_adapters
from nan_peft.fold import fold_into
base, out, *adapters = sys.argv[1:]
result = merge_adapters(adapters)
resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
try:  # reset the peak (VmHWM) to the current size (Linux >= 4.0), so that the imports' peak does not count
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    reset = True
except OSError:
    reset = False
fold_into(result, base, out)
if reset:  # ru_maxrss keeps the peak of threads that exited before the reset: read VmHWM, which was reset
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    peak = int(status["VmHWM"].split()[0]) * 1024
else:  # an overestimate of the fold's peak: it includes the imports'
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"resident_before": resident, "peak": peak, "reset": reset}))
"""
HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 512, 1536, 16, 512
LINEARS = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
           "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
           "mlp.down_proj": (HIDDEN, INTERMEDIATE)}


def synthetic_llama(folder):
    """A 210 MiB Llama checkpoint in 8 shards of two layers each (26 MiB); returns its size in bytes."""
    folder.mkdir()
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=8,
                         num_key_value_heads=8, vocab_size=VOCAB)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    weight_map, size, shards = {}, 0, LAYERS // 2
    for first in range(0, LAYERS, 2):  # constant values: only the bytes matter here, and they are fast to make
        shard = {}
        for layer in (first, first + 1):
            shard.update({f"model.layers.{layer}.{name}.weight": torch.full(shape, 0.02) for name, shape in LINEARS.items()})
            shard.update({f"model.layers.{layer}.{norm}.weight": torch.ones(HIDDEN) for norm in ("input_layernorm", "post_attention_layernorm")})
        if first == 0:
            shard["model.embed_tokens.weight"] = torch.full((VOCAB, HIDDEN), 0.01)
        if first == LAYERS - 2:
            shard.update({"model.norm.weight": torch.ones(HIDDEN), "lm_head.weight": torch.full((VOCAB, HIDDEN), 0.01)})
        file = f"model-{first // 2 + 1:05d}-of-{shards:05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        size += sum(t.numel() * 4 for t in shard.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return size


def synthetic_adapter(folder, seed, r=8, targets=("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")):
    folder.mkdir()
    generator, state = torch.Generator().manual_seed(seed), {}
    for layer in range(LAYERS):
        for name in targets:
            out, fan_in = LINEARS[name]
            prefix = f"base_model.model.model.layers.{layer}.{name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, fan_in, generator=generator) * 0.01
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, r, generator=generator) * 0.01
    save_file(state, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": [t.split(".")[-1] for t in targets],
              "base_model_name_or_path": "synthetic-llama", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_streaming_peak_memory_stays_far_below_the_model_size(tmp_path):
    size = synthetic_llama(tmp_path / "base")
    adapters = [synthetic_adapter(tmp_path / f"a{k}", seed=k) for k in (1, 2)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "base"), str(tmp_path / "out"), *map(str, adapters)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    increase = measured["peak"] - measured["resident_before"]
    print(f"\nstreaming fold of a {size / 2**20:.0f} MiB model in 8 shards: peak RSS {increase / 2**20:.1f} MiB above the "
          f"resident size before the fold ({increase / size:.1%} of the model; peak reset: {measured['reset']})")
    assert increase < 0.4 * size, f"peak grew by {increase / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB model"
    assert sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors")) == sum(
        f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
