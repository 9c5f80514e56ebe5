"""add_nan_weighted_adapter on a loaded PeftModel, against merge_adapters on the saved adapters and peft."""

import pytest
import torch
from peft import PeftModel

from models import BASES, LLAMA, input_ids
from nan_peft import NanPeftError, merge_adapters
from nan_peft.live import adapter_from_model, add_nan_weighted_adapter
from oracle import load_sources, lora_layers, scale_sources


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("options", [dict(combine="cat"), dict(combine="svd", rank=6, granularity="module"), dict(method="ties", density=0.5, rank=32)])
def test_live_merge_equals_offline_merge(llama_adapters, tmp_path, options):
    model = load_sources(LLAMA, llama_adapters)
    before = snapshot(model)
    scalings = {p: dict(layer.scaling) for p, layer in lora_layers(model).items()}
    result = add_nan_weighted_adapter(model, ["s0", "s1", "s2", "s3"], "merged", **options)

    offline = merge_adapters(llama_adapters, **options)
    torch.testing.assert_close(result.coefficients.values, offline.coefficients.values, rtol=1e-12, atol=0)
    offline.save_pretrained(tmp_path / "offline")
    reference = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "offline")

    # the sources are untouched and still the active ones
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {p: {n: s for n, s in layer.scaling.items() if n != "merged"} for p, layer in lora_layers(model).items()} == scalings
    assert model.active_adapters == ["s0", "s1", "s2", "s3"]

    model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-6)

    model.save_pretrained(tmp_path / "saved", selected_adapters=["merged"])
    again = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "saved" / "merged")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-6)


def test_live_uses_current_scaling(llama_adapters):
    """A source whose scale was changed in the model is merged with that scale."""
    model = load_sources(LLAMA, llama_adapters[:2])
    scale_sources(model, {p: {n: 2.0 for n in layer.scaling} for p, layer in lora_layers(model).items()})
    adapter = adapter_from_model(model, "s0")
    offline = merge_adapters(llama_adapters[:1])
    for path, module in adapter.modules.items():
        torch.testing.assert_close(module.delta(), 2.0 * offline.sources[0].modules[path].delta(), rtol=1e-6, atol=1e-8)


def test_live_errors(llama_adapters):
    model = load_sources(LLAMA, llama_adapters[:2])
    with pytest.raises(NanPeftError, match="no adapter 'nope'"):
        add_nan_weighted_adapter(model, ["s0", "nope"], "m")
    with pytest.raises(NanPeftError, match="already has an adapter named 's1'"):
        add_nan_weighted_adapter(model, ["s0", "s1"], "s1")


def test_live_merge_on_a_model_placed_by_accelerate(llama_adapters, tmp_path):
    """The base loaded with a device map (accelerate hooks; all on the CPU here, on GPUs where there are)."""
    from transformers import AutoModelForCausalLM

    BASES[LLAMA]().save_pretrained(tmp_path / "base")
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "base", device_map="auto")
    model = load_sources(LLAMA, llama_adapters[:2], base_model=placed)
    result = add_nan_weighted_adapter(model, ["s0", "s1"], "merged", combine="svd", rank=4)
    model.set_adapter("merged")
    offline = merge_adapters(llama_adapters[:2], combine="svd", rank=4)
    offline.save_pretrained(tmp_path / "offline")
    reference = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "offline")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.coefficients.values, offline.coefficients.values)


def head_adapter(folder, seed):
    """A peft adapter that also retrains lm_head (modules_to_save)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(BASES[LLAMA](), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    model.save_pretrained(folder)
    return folder


def test_live_reads_saved_modules_like_offline(tmp_path):
    """The sources' lm_head copies are read into `saved` (equal to what peft saved), the live merge says what it
    leaves out as merge_adapters does, per-task saving and the fold refusal see the heads, and the new adapter
    computes what the offline merge (heads dropped) computes in peft."""
    from safetensors.torch import load_file

    paths = [head_adapter(tmp_path / f"h{i}", seed=i) for i in range(2)]
    model = PeftModel.from_pretrained(BASES[LLAMA](), paths[0], adapter_name="s0")
    model.load_adapter(paths[1], adapter_name="s1")
    for i, path in enumerate(paths):
        live = adapter_from_model(model, f"s{i}")
        on_disk = {k: v for k, v in load_file(path / "adapter_model.safetensors").items() if "lora_" not in k}
        assert sorted(live.saved) == sorted(on_disk) == ["base_model.model.lm_head.weight"]
        assert all(torch.equal(live.saved[k], on_disk[k]) for k in on_disk) and live.saved_modules == ["lm_head"]

    offline = merge_adapters(paths)
    with pytest.warns(UserWarning, match=r"full modules \(lm_head: modules_to_save\) that are left out"):
        result = add_nan_weighted_adapter(model, ["s0", "s1"], "merged")
    assert result.notices() == offline.notices() != []
    assert set(result.heads) == {"s0", "s1"}
    with pytest.raises(NanPeftError, match=r"carry full modules \(lm_head: modules_to_save\)"):
        result.fold_into(tmp_path / "base", tmp_path / "folded")

    with pytest.warns(UserWarning, match="left out"):
        offline.save_pretrained(tmp_path / "offline")  # heads dropped: the merged LoRA alone
    reference = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "offline").eval()
    model.set_adapter("merged")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-6)

    result.save_pretrained(tmp_path / "per_task", heads="per_task")  # each head with the merged LoRA, as offline
    for i, path in enumerate(paths):
        with torch.no_grad():
            ours = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "per_task", subfolder=f"s{i}").eval()(input_ids()).logits
            expected = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "offline").eval()
            expected.base_model.model.lm_head.weight.copy_(load_file(path / "adapter_model.safetensors")["base_model.model.lm_head.weight"])
            torch.testing.assert_close(ours, expected(input_ids()).logits, rtol=1e-5, atol=1e-6)


def test_live_merge_in_a_classification_model(tmp_path):
    """peft's task models give each new adapter its own head copy: the live merge keeps the base model's head
    there (the sources' heads are left out, as offline) and equals the offline merge loaded by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()

    paths = []
    for seed in (1, 2):
        model = get_peft_model(classifier(), LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name or "modules_to_save" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        model.save_pretrained(tmp_path / f"c{seed}")
        paths.append(tmp_path / f"c{seed}")
    model = PeftModel.from_pretrained(classifier(), paths[0], adapter_name="s0")
    model.load_adapter(paths[1], adapter_name="s1")
    with pytest.warns(UserWarning, match="left out"):
        add_nan_weighted_adapter(model, ["s0", "s1"], "merged")
    with pytest.warns(UserWarning, match="left out"):
        merge_adapters(paths).save_pretrained(tmp_path / "offline")
    model.set_adapter("merged")
    assert torch.equal(model.base_model.model.score.modules_to_save["merged"].weight, classifier().score.weight)
    reference = PeftModel.from_pretrained(classifier(), tmp_path / "offline").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids()).logits, reference(input_ids()).logits, rtol=1e-5, atol=1e-6)
        assert (model(input_ids()).logits - classifier()(input_ids()).logits).abs().max() > 1e-3
