"""--serve ENGINE: the output is fitted to the engine (exactly), what changed is said, the impossible refused."""

import json

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel

from models import BASES, LLAMA, input_ids
from nan_peft import NanPeftError, merge_adapters, read_adapter
from nan_peft.cli import cli
from nan_peft.serving import engine_rank, loads, plan_for, serving_findings


@pytest.mark.parametrize("engine,rank,expected", [("vllm", 14, 16), ("vllm", 8, 8), ("vllm", 300, 320), ("lorax", 4, 16),
                                                   ("tgi", 20, 32), ("peft", 3, 3)])
def test_engine_rank(engine, rank, expected):
    assert engine_rank(engine, rank) == expected


def logits(folder):
    model = PeftModel.from_pretrained(BASES[LLAMA](), folder).eval()
    with torch.no_grad():
        return model(input_ids()).logits


def test_vllm_profile_pads_exactly_and_drops_carried_weights(llama_adapters, tmp_path):
    result = merge_adapters(llama_adapters[:3], combine="svd", rank=12)  # rslora carries the embedding base weight
    plan = plan_for(result.adapter, "vllm")
    assert plan.rank == 16 and any("padded the rank from 12 to 16" in c for c in plan.changes)
    assert any("left out 1 full tensor" in c for c in plan.changes) and loads(plan.findings)
    result.save_pretrained(tmp_path / "plain")
    result.save_pretrained(tmp_path / "vllm", serve="vllm")
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16
    served = read_adapter(tmp_path / "vllm")
    assert served.ranks == {16} and not served.extras
    assert loads(serving_findings(served)["vllm"])
    torch.testing.assert_close(logits(tmp_path / "vllm"), logits(tmp_path / "plain"), rtol=1e-5, atol=1e-6)


def test_engine_refusal_writes_nothing(llama_adapters, tmp_path):
    result = merge_adapters(llama_adapters)  # layer1 adapts q_proj in one layer only: LoRAX stacks per type
    with pytest.raises(NanPeftError, match="lorax cannot serve the merged adapter: LoRAX applies a module type only if every layer"):
        result.save_pretrained(tmp_path / "out", serve="lorax")
    assert not (tmp_path / "out").exists()


def test_cli_serve_says_what_changed(llama_adapters, tmp_path):
    paths = [str(p) for p in llama_adapters[:2]]
    result = CliRunner().invoke(cli, ["merge", *paths, "-o", str(tmp_path / "out"), "--serve", "vllm", "--json"])
    assert result.exit_code == 0, result.stderr
    assert "vllm: padded the rank from 12 to 16 with zeros (exact) for vllm" in result.stderr
    document = json.loads(result.stdout)
    assert document["serve"] == "vllm" and document["rank"] == 16  # the rank written (12 padded for vLLM)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 16
    refused = CliRunner().invoke(cli, ["merge", *map(str, llama_adapters), "-o", str(tmp_path / "x"), "--serve", "tgi"])
    assert refused.exit_code == 1 and refused.stderr.startswith("error: tgi cannot serve the merged adapter")
    assert not (tmp_path / "x").exists()


def test_merge_of_layer_restricted_adapters_is_refused_like_its_sources(tmp_path):
    """Sources with layers_to_transform=[1] adapt q_proj / v_proj in layer 1 only, which LoRAX and TGI drop; the
    merged adapter keeps no layers_to_transform, but its module paths (what peft adapts when loading it) say the
    same, and the engines' check refuses it as it refuses the sources."""
    from models import make_adapter
    from oracle import load_sources, lora_layers, peft_deltas

    paths = [make_adapter(tmp_path / f"s{i}", seed=i, r=16, lora_alpha=16, layers_to_transform=[1]) for i in range(2)]
    sources = [read_adapter(p) for p in paths]
    result = merge_adapters(paths, combine="svd", rank=16)
    result.save_pretrained(tmp_path / "merged")
    merged = read_adapter(tmp_path / "merged")
    peft_model = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "merged")
    assert sorted(lora_layers(peft_model)) == sorted(merged.modules) == [f"model.layers.1.self_attn.{t}" for t in ("q_proj", "v_proj")]
    # the exact (cat) merge of the same sources is sum_k c_k dW_k of peft's own updates, on those modules only
    exact = merge_adapters(paths, combine="cat")
    deltas = peft_deltas(load_sources(LLAMA, paths))
    c = exact.coefficients.per_adapter.tolist()
    for path, module in exact.adapter.modules.items():
        torch.testing.assert_close(module.delta(), sum(c[i] * deltas[path][f"s{i}"] for i in range(2)), rtol=1e-5, atol=1e-7)
    for engine in ("lorax", "tgi"):
        expected = "applies a module type only if every layer of the model has it"
        for adapter in (*sources, merged, exact.adapter):
            assert any(expected in f.message for f in serving_findings(adapter)[engine] if f.level == "error"), (engine, adapter.name)
        assert any(expected in f.message for f in plan_for(result.adapter, engine).findings if f.level == "error")
        with pytest.raises(NanPeftError, match=f"{engine} cannot serve the merged adapter: .*{expected}"):
            result.save_pretrained(tmp_path / engine, serve=engine)
        assert not (tmp_path / engine).exists()
    assert loads(plan_for(result.adapter, "vllm").findings)  # vLLM applies each module on its own


def test_full_layer_coverage_is_not_partial(llama_adapters):
    """Every layer adapted (or an adapter only on modules outside the layers): nothing partial to report."""
    result = merge_adapters(llama_adapters[:2])
    for engine in ("lorax", "tgi"):
        assert not any("every layer" in f.message for f in plan_for(result.adapter, engine).findings)
