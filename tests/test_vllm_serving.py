"""A merged adapter written with `--serve vllm` gives, served by vLLM with `--enable-lora`, the logprobs peft gives.

On a machine with a GPU, one command (vLLM is far too large for this project's CI):

    pip install vllm && pip install -e ".[test]" && python -m pytest -q tests/test_vllm_serving.py

The fixture builds everything locally, with no downloads: a tiny Llama from a config, saved in float16 as
safetensors with no tokenizer (vLLM runs it with `skip_tokenizer_init`, token ids in); three real peft adapters
(different ranks and alphas, random non-zero factors on q/k/v/o/gate/up/down); their NAN merge written by the
command line, `nan-peft merge a0 a1 a2 -o merged --serve vllm` (rank 2 + 4 + 8 = 14, padded to 16, one of vLLM's
--max-lora-rank values); and peft's reference, the log-softmax of PeftModel.from_pretrained(base, merged) computed
in float32 from the same float16 weights, on fixed prompts of token ids.

Two halves:
- CPU (runs everywhere, in CI): the adapter as written is what vLLM's loader accepts and what it computes. Its
  config passes vLLM's checks (rank <= max_lora_rank, one of the allowed ranks, no DoRA / bias / modules_to_save,
  no patterns), its tensor names parse as vLLM parses them into modules vLLM's Llama takes LoRA on, and vLLM's
  arithmetic (W + scaling * B @ A with scaling = lora_alpha / r) applied to the base in plain torch gives peft's
  logprobs; those equal the sources combined with the recorded NAN coefficients. The tolerance used on the GPU is
  checked against transformers' own half-precision run, and the adapter moves the logprobs by far more than it.
- GPU (skipped unless `import vllm` works and CUDA is available): vllm.LLM(enable_lora=True, max_lora_rank = the
  rank in merge_record.json) serves the base, then the merged adapter through a LoRARequest; its top-K next-token
  logprobs (and, separately, its prompt logprobs) equal peft's within the dtype's tolerance, the base alone equals
  transformers', and the served adapter moves vLLM's logprobs away from the base by >= 10x the tolerance, so the
  test cannot pass with the adapter silently dropped.

What this relies on in vLLM (read at vllm-project/vllm main, 2026; vLLM 0.33.0 on PyPI pins transformers
>=5.16.1,<5.20 and torch 2.13.0, which this project supports):
- vllm/lora/peft_helper.py, PEFTHelper: reads adapter_config.json (r, lora_alpha, target_modules, use_rslora,
  use_dora, bias, modules_to_save, rank_pattern, alpha_pattern, ...); scaling = lora_alpha / r, or / sqrt(r) with
  use_rslora (`_scaling`), per module through rank_pattern / alpha_pattern (`get_rank_and_scaling`);
  `validate_legal` refuses r > max_lora_rank ("LoRA rank {r} is greater than max_lora_rank"), a bias other than
  "none", DoRA, LoRA bias, modules_to_save other than classifier/score, PiSSA-like inits.
- vllm/config/lora.py: `MaxLoRARanks = Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]`, default 16.
- vllm/lora/lora_model.py, LoRAModel.from_local_checkpoint: reads adapter_model.safetensors; every key must parse
  (vllm/lora/utils.py parse_fine_tuned_lora_name: drop "base_model.model.", then "<module>.lora_A.weight" /
  "<module>.lora_B.weight") to a module whose last name is one the model takes LoRA on, else "While loading ...,
  expected target modules in ..."; factors are cast to the LoRA dtype (the model's with lora_dtype="auto").
- vllm/model_executor/models/llama.py: packed_modules_mapping qkv_proj = [q_proj, k_proj, v_proj],
  gate_up_proj = [gate_proj, up_proj]; with o_proj and down_proj, the modules LoRA applies to.
- vllm/lora/layers/logits_processor.py: with LoRA, only vocab_size <= 258048 is required (a small vocab is fine).
- vllm/entrypoints/llm.py: LLM.generate(prompts, sampling_params, *, use_tqdm, lora_request, ...); a prompt of
  token ids is the TypedDict TokensPrompt, {"prompt_token_ids": [...]} (vllm/inputs), the only kind accepted with
  skip_tokenizer_init (vLLM's own tests/entrypoints/llm test_skip_tokenizer_initialization).
  vllm/lora/request.py: LoRARequest(lora_name, lora_int_id, lora_path).
- vllm/v1/sample/sampler.py: logprobs_mode defaults to "raw_logprobs", the log-softmax of the raw logits before
  temperature or penalties, so they compare with peft's log-softmax; the top `logprobs` plus the sampled token.
  vllm/logprobs.py: each position is a dict {token id: Logprob(logprob, rank, decoded_token)} (also through
  FlatLogprobs); prompt_logprobs[0] is None.

Environment: NAN_PEFT_VLLM_DTYPE (float16, the default, which every attention backend takes; float32, where the
installed vLLM has a backend for it) and NAN_PEFT_VLLM_GPU_MEMORY (the gpu_memory_utilization fraction, default
0.2).
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = sorted(VLLM_LLAMA_LORA_MODULES)

# name, rank, lora_alpha, magnitude of the random lora_B entries (lora_A rows have norm about 1)
ADAPTERS = (("a0", 4, 8, 0.3), ("a1", 8, 16, 0.15), ("a2", 2, 4, 0.6))
PROMPTS = (
    [1, 17, 250, 33, 401, 5, 99, 311, 77, 12, 480, 64],
    [1, 300, 301, 302, 7],
    [1, 42, *range(100, 140, 3)],
)
TOP_K = 8  # <= vLLM's max_logprobs (20 by default)

DTYPE = os.environ.get("NAN_PEFT_VLLM_DTYPE", "float16")
# max |logprob(vLLM) - logprob(peft, float32)|: the base weights are the same float16 numbers on both sides, so
# what differs is vLLM's arithmetic in DTYPE (and the factors cast to it). transformers' own run in float16 is
# within 0.012 of float32 on these prompts (checked below against a third of this). float32 may run on TF32
# matmuls. No bfloat16: its 8-bit mantissa moves these logprobs by up to 0.21, too close to the adapter's effect
# (3 to 4.6 nats) for a tolerance MARGIN times smaller.
TOLERANCE = {"float16": 0.05, "float32": 0.05}[DTYPE]
MARGIN = 10  # the adapter must move the served logprobs by at least MARGIN x TOLERANCE


@dataclass
class Served:
    base: Path
    merged: Path
    adapters: list[Path]
    rank: int
    record: dict
    config: dict
    reference_base: list[torch.Tensor]  # per prompt, (length, vocab) float64 log-softmax of transformers' base
    reference_lora: list[torch.Tensor]  # the same with peft's PeftModel.from_pretrained(base, merged)


def tiny_llama():
    """Shapes vLLM's CUDA paths take: head_dim 64 (every attention backend has it), vocab 512 (a multiple of
    64, no lm_head padding), max_position_embeddings 256 >= max_model_len. initializer_range 0.1 spreads the
    next-token logprobs over several nats, so that a wrong logit would show."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def load_base(folder: Path, dtype=torch.float32):
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # as nan_peft/fold.py
    return transformers.LlamaForCausalLM.from_pretrained(folder, **{key: dtype}).eval()


def logprobs(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([p])).logits[0].double(), -1) for p in PROMPTS]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    from click.testing import CliRunner
    from peft import LoraConfig, PeftModel, get_peft_model

    from nan_peft.cli import cli

    root = tmp_path_factory.mktemp("vllm")
    base_dir = root / "base"
    tiny_llama().to(torch.float16).save_pretrained(base_dir)  # config.json, generation_config.json, safetensors

    base32 = load_base(base_dir)  # the float16 weights, as float32
    adapters = []
    for index, (name, rank, alpha, magnitude) in enumerate(ADAPTERS):
        lora = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
        model = get_peft_model(copy.deepcopy(base32), lora)
        generator = torch.Generator().manual_seed(10 + index)
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if "lora_A" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
                elif "lora_B" in parameter_name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * magnitude)
        model.peft_config["default"].base_model_name_or_path = str(base_dir)
        model.save_pretrained(root / name)
        adapters.append(root / name)

    merged = root / "merged"
    run = CliRunner().invoke(cli, ["merge", *map(str, adapters), "-o", str(merged), "--serve", "vllm", "--quiet"])
    assert run.exit_code == 0, run.output
    record = json.loads((merged / "merge_record.json").read_text())
    config = json.loads((merged / "adapter_config.json").read_text())

    reference_base = logprobs(base32)
    reference_lora = logprobs(PeftModel.from_pretrained(base32, merged).eval())
    return Served(base_dir, merged, adapters, int(record["rank"]), record, config, reference_base, reference_lora)


# --- CPU: the adapter is what vLLM loads, and vLLM's arithmetic on it gives peft's logprobs -----------------------


def vllm_module(key: str) -> tuple[str, str]:
    """(module, "lora_A" | "lora_B") as vllm/lora/utils.py parse_fine_tuned_lora_name reads a tensor name."""
    name = key.removeprefix("base_model.model.")
    parts = name.split(".")
    assert parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"), f"vLLM cannot parse {key}"
    return ".".join(parts[:-2]), parts[-2]


def vllm_scaling(config: dict, rank: int, alpha: float) -> float:
    """vllm/lora/peft_helper.py PEFTHelper._scaling."""
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def test_served_config_is_what_vllm_accepts(served):
    config, rank = served.config, served.rank
    assert served.record["options"]["serve"] == "vllm"
    assert config["r"] == rank == 16  # 2 + 4 + 8 = 14 (cat), padded to vLLM's next --max-lora-rank
    assert rank in VLLM_MAX_LORA_RANKS
    # PEFTHelper.validate_legal and _validate_features
    assert not config.get("use_dora") and config.get("bias", "none") == "none" and not config.get("modules_to_save")
    assert not config.get("lora_bias") and config.get("init_lora_weights", True) in (True, "gaussian")
    assert not config.get("rank_pattern") and not config.get("alpha_pattern") and not config.get("layer_replication")
    assert max([config["r"], *(config.get("rank_pattern") or {}).values()]) <= rank
    assert vllm_scaling(config, config["r"], config["lora_alpha"]) == 1.0  # the scales are baked into the factors

    from safetensors import safe_open

    with safe_open(served.merged / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in keys}
    modules = {}
    for key in keys:
        module, kind = vllm_module(key)
        assert module.rsplit(".", 1)[-1] in VLLM_LLAMA_LORA_MODULES, key  # LoRAModel.from_local_checkpoint
        modules.setdefault(module, {})[kind] = shapes[key]
    assert len(modules) == 2 * len(TARGETS)  # every targeted module of both layers, each with both factors
    base = load_base(served.base)
    for module, factors in modules.items():
        out_features, in_features = base.get_submodule(module).weight.shape
        assert factors == {"lora_A": (rank, in_features), "lora_B": (out_features, rank)}, module


def fold(base, updates: dict[str, torch.Tensor]):
    model = copy.deepcopy(base)
    with torch.no_grad():
        for module, update in updates.items():
            weight = model.get_submodule(module).weight
            weight += update.to(weight.dtype)
    return model


def read_factors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    factors = {}
    for key, tensor in load_file(folder / "adapter_model.safetensors").items():
        module, kind = vllm_module(key)
        factors.setdefault(module, {})[kind] = tensor.double()
    return factors


def test_vllm_arithmetic_on_cpu_gives_peft_logprobs(served):
    """W + scaling * B @ A, scaling and module names as vLLM reads them, equals peft on the merged adapter; and
    peft's reference is the NAN merge of the sources: sum_k c_k (alpha_k / r_k) B_k A_k with the recorded c_k."""
    base = load_base(served.base)
    scaling = vllm_scaling(served.config, served.config["r"], served.config["lora_alpha"])
    served_updates = {m: scaling * f["lora_B"] @ f["lora_A"] for m, f in read_factors(served.merged).items()}
    for ours, reference in zip(logprobs(fold(base, served_updates)), served.reference_lora):
        torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)

    coefficients = served.record["coefficients"]["per_adapter"]
    assert set(coefficients) == {name for name, *_ in ADAPTERS}
    sources = {}
    for (name, rank, alpha, _), folder in zip(ADAPTERS, served.adapters):
        for module, f in read_factors(folder).items():
            update = coefficients[name] * (alpha / rank) * f["lora_B"] @ f["lora_A"]
            sources[module] = sources.get(module, 0) + update
    assert sources.keys() == served_updates.keys()
    for ours, reference in zip(logprobs(fold(base, sources)), served.reference_lora):
        torch.testing.assert_close(ours, reference, rtol=0, atol=2e-5)


def test_tolerance_fits_the_dtype_and_the_adapter_exceeds_it(served):
    """transformers' own run in DTYPE (weights and factors in DTYPE, as vLLM holds them) stays within a third of
    TOLERANCE of the float32 reference; the adapter moves the top-K logprobs by more than MARGIN x TOLERANCE."""
    from peft import PeftModel

    dtype = getattr(torch, DTYPE)
    half = PeftModel.from_pretrained(load_base(served.base, dtype), served.merged).to(dtype).eval()
    for ours, reference in zip(logprobs(half), served.reference_lora):
        assert (ours - reference).abs().max() < TOLERANCE / 3
    for lora, base in zip(served.reference_lora, served.reference_base):
        top = lora[-1].topk(TOP_K).indices
        assert (lora[-1, top] - base[-1, top]).abs().max() > MARGIN * TOLERANCE


# --- GPU: vLLM serves the merged adapter ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(served):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the vLLM half runs on a GPU machine")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: simpler to tear down
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm)")
    engine = vllm.LLM(
        model=str(served.base), skip_tokenizer_init=True, dtype=DTYPE, seed=0,
        enable_lora=True, max_lora_rank=served.rank, max_loras=1, max_cpu_loras=1,
        enforce_eager=True, max_model_len=64, max_num_seqs=4, enable_prefix_caching=False,
        gpu_memory_utilization=float(os.environ.get("NAN_PEFT_VLLM_GPU_MEMORY", "0.2")),
    )
    yield engine
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def position(entries) -> dict[int, float]:
    """{token id: logprob} from one position of vLLM's logprobs (a dict of Logprob, also through FlatLogprobs)."""
    return {int(token): float(logprob.logprob) for token, logprob in entries.items()}


def generate(llm, merged: Path | None) -> list:
    """One request per prompt, all with the merged adapter (a LoRARequest) or none (the base model)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # a TypedDict: the plain dict is the same thing
        TokensPrompt = dict
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_K, prompt_logprobs=TOP_K, detokenize=False)
    request = LoRARequest("merged", 1, str(merged)) if merged is not None else None
    prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in PROMPTS]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=request)
    assert len(outputs) == len(PROMPTS)
    return outputs


def worst(entries: dict[int, float], reference: torch.Tensor) -> float:
    return max(abs(value - float(reference[token])) for token, value in entries.items())


def check_next_token(outputs, reference: list[torch.Tensor], label: str) -> list[dict[int, float]]:
    """vLLM's top-K next-token logprobs equal the reference's, and its top K are the reference's (up to ties
    within the tolerance); returns them per prompt."""
    found = []
    for prompt, output, expected in zip(PROMPTS, outputs, reference):
        entries = position(output.outputs[0].logprobs[0])
        last = expected[-1]
        error = worst(entries, last)
        assert error < TOLERANCE, (label, prompt, error)
        values, tokens = last.topk(TOP_K + 1)
        clear = [int(t) for t, v in zip(tokens[:TOP_K], values[:TOP_K]) if v > values[TOP_K] + 2 * TOLERANCE]
        assert set(clear) <= set(entries), (label, prompt, clear, sorted(entries))
        greedy = output.outputs[0].token_ids[0]
        assert float(last[greedy]) > float(values[0]) - 2 * TOLERANCE, (label, prompt, greedy, int(tokens[0]))
        found.append(entries)
    return found


def test_vllm_base_equals_transformers(llm, served):
    """Sanity check of the tiny model itself: vLLM without a LoRA gives transformers' logprobs."""
    check_next_token(generate(llm, None), served.reference_base, "base")


def test_vllm_serves_the_merged_adapter_like_peft(llm, served):
    entries = check_next_token(generate(llm, served.merged), served.reference_lora, "merged adapter")
    # the adapter was applied: vLLM's served logprobs are far from the base model's
    moved = max(worst(e, base[-1]) for e, base in zip(entries, served.reference_base))
    assert moved > MARGIN * TOLERANCE, f"vLLM's logprobs moved by {moved:.3g} only: was the adapter applied?"


def test_vllm_prompt_logprobs_with_the_adapter_equal_peft(llm, served):
    """Every prompt position (its token and the top K), with the adapter. A separate test: prompt logprobs take
    another path through vLLM's LoRA mapping (vllm-project/vllm#16668 was a bug there)."""
    for prompt, output, expected in zip(PROMPTS, generate(llm, served.merged), served.reference_lora):
        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        for index in range(1, len(prompt)):
            entries = position(output.prompt_logprobs[index])
            assert prompt[index] in entries
            error = worst(entries, expected[index - 1])  # row i - 1 predicts token i
            assert error < TOLERANCE, (prompt, index, error)
