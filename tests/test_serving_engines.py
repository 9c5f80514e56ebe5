"""Each engine profile against a small reference of that engine's own loading arithmetic, written from its
source: what nan-peft writes for an engine is served with the update peft computes, and what it would serve
differently is reported."""

import json
import math

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from models import BASES, LLAMA
from nan_peft import LoraAdapter, LoraModule, NanPeftError, merge_adapters, read_adapter
from nan_peft.cli import cli
from nan_peft.serving import ENGINES, Target, loads, plan_for, serving_findings


def peft_updates(folder) -> dict[str, torch.Tensor]:
    """Every module's update as peft applies it (get_delta_weight), keyed by module path."""
    model = PeftModel.from_pretrained(BASES[LLAMA](), folder)
    return {
        name.removeprefix("base_model.model."): layer.get_delta_weight("default").double()
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A
    }


def sgmv_served_updates(folder, tensor_parallel: int, type_order: list[str]) -> dict[str, torch.Tensor]:
    """LoRAX's LoraWeights.load (server/lorax_server/adapters/lora.py) and TGI's prepare_weights
    (server/text_generation_server/adapters/lora.py), reduced to their arithmetic: module types load one after
    another; each module of a type is scaled by lora_alpha / config.r, then the type's rank is padded by
    pad_rank (utils/punica.py: to 8 * world_size when at or below it, else to the next multiple of 16) and
    `config.r = padded_rank` is kept for the types that follow."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    r, alpha, served = config["r"], config["lora_alpha"], {}
    for kind in type_order:
        for key in sorted(k for k in tensors if k.endswith(f"{kind}.lora_A.weight")):
            path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            A, B = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
            served[path] = alpha / r * (B @ A)
        min_rank = 8 * tensor_parallel
        r = min_rank if r <= min_rank else (r + 15) // 16 * 16
    return served


@pytest.mark.parametrize("tensor_parallel", [1, 2, 4, 8])
@pytest.mark.parametrize("rank", [4, 8, 16, 24, 40])
@pytest.mark.parametrize("engine", ["lorax", "tgi"])
def test_sgmv_engines_serve_what_peft_applies(llama_adapters, tmp_path, engine, rank, tensor_parallel):
    result = merge_adapters(llama_adapters[:1], combine="cat", rank=rank)  # q_proj and v_proj, zero-padded to `rank`
    target = Target(engine, tensor_parallel)
    written = result.save_pretrained(tmp_path / "served", serve=target)
    r = json.loads((written / "adapter_config.json").read_text())["r"]
    assert r >= max(rank, 8 * tensor_parallel) and r % tensor_parallel == 0
    expected = peft_updates(written)
    for order in (["q_proj", "v_proj"], ["v_proj", "q_proj"]):
        served = sgmv_served_updates(written, tensor_parallel, order)
        assert served.keys() == expected.keys()
        for path, update in served.items():
            torch.testing.assert_close(update, expected[path], rtol=1e-6, atol=1e-9)
    inspected = json.loads(CliRunner().invoke(cli, ["inspect", str(written), "--json", "--tensor-parallel", str(tensor_parallel)]).stdout)
    assert inspected["serving"][engine]["loads"]

    plain = result.save_pretrained(tmp_path / "plain")  # rank `rank`, not fitted to the engine
    served = sgmv_served_updates(plain, tensor_parallel, ["q_proj", "v_proj"])
    padded = 8 * tensor_parallel if rank <= 8 * tensor_parallel else (rank + 15) // 16 * 16
    document = json.loads(CliRunner().invoke(cli, ["inspect", str(plain), "--json", "--tensor-parallel", str(tensor_parallel)]).stdout)
    errors = [f["message"] for f in document["serving"][engine]["findings"] if f["level"] == "error"]
    if padded == rank:
        assert not errors
    else:  # the second type is served at rank / padded of peft's scale, and inspect names that scale
        v = next(p for p in served if p.endswith("v_proj"))
        torch.testing.assert_close(served[v], peft_updates(plain)[v] * rank / padded)
        assert any(f"pads rank {rank} to {padded}" in m and f"lora_alpha/{padded} = {rank / padded:g}" in m for m in errors), errors


def per_rank_served(folder, rslora_aware: bool) -> dict[str, torch.Tensor]:
    """llama.cpp (src/llama-graph.cpp build_lora_mm: scale = adapter.lora.alpha / rank of the factors, with one
    alpha for the file, convert_lora_to_gguf.py) and TensorRT-LLM (tensorrt_llm/lora_manager.py load_from_hf:
    lora_alpha / effective_rank, or / sqrt with use_rslora)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    served = {}
    for key in (k for k in tensors if k.endswith("lora_A.weight")):
        A, B = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        rank = A.shape[0]
        scale = config["lora_alpha"] / (math.sqrt(rank) if rslora_aware and config.get("use_rslora") else rank)
        served[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = scale * (B @ A)
    return served


def config_scale_served(folder) -> dict[str, torch.Tensor]:
    """SGLang (python/sglang/srt/lora/lora.py: scaling = lora_alpha / r from the config, for every module) and
    vLLM before 0.32 (vllm/lora/peft_helper.py: lora_alpha / r, or / sqrt(r) with use_rslora)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(folder / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): scale * (tensors[key.replace("lora_A", "lora_B")].double() @ tensors[key].double())
        for key in tensors
        if key.endswith("lora_A.weight")
    }


@pytest.mark.parametrize("engine", [e for e in ENGINES if e not in ("lorax", "tgi")])
def test_every_engine_serves_its_output_as_peft_does(llama_adapters, tmp_path, engine):
    out = tmp_path / engine
    merged = CliRunner().invoke(cli, ["merge", *map(str, llama_adapters[:2]), "-o", str(out), "--serve", engine, "--json"])
    assert merged.exit_code == 0, merged.stderr
    document = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).stdout)
    assert document["serving"][engine]["loads"], document["serving"][engine]
    expected = peft_updates(out)
    references = {
        "vllm": config_scale_served, "sglang": config_scale_served,
        "llamacpp": lambda f: per_rank_served(f, rslora_aware=False), "trtllm": lambda f: per_rank_served(f, rslora_aware=True),
        "peft": peft_updates,
    }  # fmt: skip
    served = references[engine](out)
    assert served.keys() == expected.keys()
    for path, update in served.items():
        torch.testing.assert_close(update, expected[path], rtol=1e-6, atol=1e-9)


def test_engine_references_catch_the_sources_variants(llama_adapters):
    """The references above disagree with peft on the sources' own variants (patterns, rsLoRA), and the profiles
    say so: the written form is what makes every engine agree."""
    _, patterns, rslora, _ = llama_adapters
    expected = peft_updates(patterns)
    served = config_scale_served(patterns)
    assert any(not torch.allclose(served[p], expected[p]) for p in expected)
    findings = serving_findings(read_adapter(patterns))
    assert {e for e in ENGINES if not loads(findings[e])} >= {"vllm", "sglang", "lorax", "tgi", "llamacpp", "trtllm"}
    rs = serving_findings(read_adapter(rslora))
    assert not loads(rs["sglang"]) and not loads(rs["llamacpp"])  # neither applies rsLoRA
    assert any("skips LoRA on lm_head / embed_tokens silently" in f.message for f in rs["trtllm"])


def adapter(modules, **config):
    config = {"r": 8, "lora_alpha": 8, "base_model_name_or_path": "base", **config}
    return LoraAdapter("a", "a", config, modules)


def linear(rank, scale=1.0):
    return LoraModule(torch.ones(rank, 8), torch.ones(8, rank), scale)


def test_vllm_rules_follow_its_release():
    patterned = adapter({"model.layers.0.self_attn.q_proj": linear(8), "model.layers.0.self_attn.v_proj": linear(2, scale=4.0)},
                        rank_pattern={"v_proj": 2})
    old = serving_findings(patterned)["vllm"]
    assert not loads(old) and any("before 0.32.0" in f.message for f in old)
    assert loads(serving_findings(patterned, engine_version="0.32.0")["vllm"])
    assert not loads(serving_findings(patterned, engine_version="0.31.0")["vllm"])

    head = adapter({"model.layers.0.self_attn.q_proj": linear(8)}, modules_to_save=["score"])
    head_findings = serving_findings(head)["vllm"]
    assert any("0.31.0 and later accept classifier / score heads" in f.message for f in head_findings)
    assert loads(serving_findings(head, engine_version="0.31.0")["vllm"])
    other = adapter({"model.layers.0.self_attn.q_proj": linear(8)}, modules_to_save=["lm_head"])
    assert not loads(serving_findings(other, engine_version="0.33.0")["vllm"])


def test_sglang_and_trtllm_rules():
    q_only = adapter({f"model.layers.0.self_attn.{t}": linear(8) for t in ("q_proj", "k_proj")})
    findings = serving_findings(q_only)
    assert any("from q_proj and v_proj" in f.message for f in findings["sglang"] if f.level == "error")
    assert loads(findings["trtllm"])  # TensorRT-LLM fills missing q/k/v with zeros
    qv = adapter({f"model.layers.0.self_attn.{t}": linear(8) for t in ("q_proj", "v_proj")})
    infos = [f.message for f in serving_findings(qv, where="OUT")["sglang"] if f.level == "info"]
    assert infos == ["start SGLang with --enable-lora --max-lora-rank 8 --lora-target-modules q_proj v_proj --lora-paths merged=OUT"]
    gpt2 = adapter({f"transformer.h.{i}.attn.c_attn": linear(8) for i in range(2)})
    findings = serving_findings(gpt2)
    assert not loads(findings["sglang"]) and not loads(findings["trtllm"]) and loads(findings["llamacpp"])
    big = adapter({"model.layers.0.self_attn.q_proj": linear(96)}, r=96, lora_alpha=96)
    assert any("default max_lora_rank (64)" in f.message for f in serving_findings(big)["trtllm"])


def test_bad_serving_input_is_one_line_and_writes_nothing(llama_adapters, tmp_path):
    paths = [str(p) for p in llama_adapters[:2]]
    for args, code, message in [
        (["--serve", "nope"], 2, "Invalid value for '--serve'"),
        (["--serve", "lorax", "--tensor-parallel", "0"], 2, "Invalid value for '--tensor-parallel'"),
        (["--tensor-parallel", "2"], 2, "--tensor-parallel and --engine-version go with --serve"),
        (["--serve", "vllm", "--engine-version", "new"], 1, "--engine-version must look like 0.32.0"),
        (["--serve", "vllm", "--rank", "600"], 1, "vllm cannot serve the merged adapter: rank 600 exceeds vLLM's largest --max-lora-rank (512)"),
    ]:
        result = CliRunner().invoke(cli, ["merge", *paths, "-o", str(tmp_path / "out"), *args])
        assert result.exit_code == code and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) <= 3 and not (tmp_path / "out").exists()
    with pytest.raises(NanPeftError, match="--tensor-parallel must be a whole number of at least 1"):
        plan_for(merge_adapters(llama_adapters[:1]).adapter, Target("lorax", 0))


def test_served_output_records_the_deployment(llama_adapters, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", *map(str, llama_adapters[:2]), "-o", str(out), "--serve", "tgi",
                                      "--tensor-parallel", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    record = json.loads((out / "merge_record.json").read_text())
    assert document["rank"] == record["rank"] == json.loads((out / "adapter_config.json").read_text())["r"] == 32
    assert (document["tensor_parallel"], record["options"]["tensor_parallel"], record["options"]["serve"]) == (4, 4, "tgi")
    card = (out / "README.md").read_text()
    assert "vLLM, SGLang, LoRAX, TGI, TensorRT-LLM, llama.cpp" in card


def test_cli_writes_gguf_for_llama_cpp(llama_adapters, tmp_path):
    gguf = pytest.importorskip("gguf")
    base = tmp_path / "base"
    BASES[LLAMA]().save_pretrained(base)
    paths = [str(p) for p in llama_adapters[:2]]
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["merge", *paths, "-o", str(out), "--format", "gguf", "--base", str(base), "--json"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_model.gguf", "merge_record.json"]
    record = json.loads((out / "merge_record.json").read_text())
    assert (record["options"]["serve"], record["options"]["format"], record["options"]["base"]) == ("llamacpp", "gguf", str(base))
    reader = gguf.GGUFReader(out / "adapter_model.gguf")
    merged = merge_adapters(llama_adapters[:2])
    assert len(reader.tensors) == 2 * len(merged.adapter.modules)
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == record["rank"]

    for args, code, message in [
        (["--format", "gguf"], 1, "--format gguf needs the base model's config.json: pass --base BASE (its folder); tiny-llama is not one"),
        (["--format", "gguf", "--base", str(base), "--serve", "vllm"], 2, "--format gguf writes one llama.cpp adapter"),
        (["--base", str(base)], 2, "--base goes with --format gguf"),
    ]:
        refused = CliRunner().invoke(cli, ["merge", *paths, "-o", str(tmp_path / "x"), *args])
        assert refused.exit_code == code and message in refused.stderr, (args, refused.stderr)
        assert not (tmp_path / "x").exists()
