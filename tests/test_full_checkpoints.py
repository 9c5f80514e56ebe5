"""Full fine-tuned checkpoints merged as task vectors (nan-peft merge --base BASE FT1 FT2 ...), against dense
float64 references written from the math (tau_k = W_k - W_0 read from the files, NAN c_k ~ 1/||tau_k||, the
rules' formulas), transformers' loading of the output, and peft's own merge of a LoRA for mixed inputs."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from models import GPT2, LLAMA, fine_tune, input_ids, make_adapter, tiny_gpt2, tiny_llama
from nan_peft import NanPeftError
from nan_peft.cli import cli
from nan_peft.full import merge_checkpoints, read_plan, task_vector_gram
from nan_peft.rules import RANDOM, RULES, SPECTRAL, module_generator
from nan_peft.spec import MergeSpec

TOKENIZER = '{"version": "1.0", "model": {"type": "BPE"}}\n'
BUILDERS = {LLAMA: tiny_llama, GPT2: tiny_gpt2}


def tensors(folder, dtype=torch.float64):
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            out.update({key: handle.get_tensor(key).to(dtype) for key in handle.keys()})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a sharded base (with tokenizer files) and three fine-tunes of known task-vector norms,
    each in its own shard layout."""
    root = tmp_path_factory.mktemp("full")
    made = {}
    for arch, builder in BUILDERS.items():
        base = root / arch / "base"
        builder().save_pretrained(base, max_shard_size="40KB")
        (base / "tokenizer.json").write_text(TOKENIZER)
        fts = [fine_tune(builder, root / arch / f"ft{k}", seed=k, norm=n, shard=s)
               for k, (n, s) in enumerate([(0.5, "30KB"), (2.0, "100MB"), (1.2, "60KB")])]
        made[arch] = (base, fts)
    return made


def reference(base, inputs, weights=None, exponent=1.0):
    """W_0, the task vectors and the NAN coefficients (or `weights`) in float64, from the files."""
    w0 = tensors(base)
    taus = [{name: t - w0[name] for name, t in tensors(ft).items()} for ft in inputs]
    norms = torch.tensor([math.sqrt(sum(float(t.square().sum()) for t in tau.values())) for tau in taus], dtype=torch.float64)
    c = norms.pow(-exponent) / norms.pow(-exponent).sum() if weights is None else torch.tensor(weights, dtype=torch.float64)
    return w0, taus, norms, c


@pytest.mark.parametrize("arch", [LLAMA, GPT2])
def test_nan_merge_matches_float64_reference_and_loads(models, arch, tmp_path):
    base, fts = models[arch]
    done = merge_checkpoints(base, fts, tmp_path / "out", command=["nan-peft"])
    w0, taus, norms, c = reference(base, fts)
    assert torch.allclose(norms, torch.tensor([0.5, 2.0, 1.2], dtype=torch.float64), rtol=1e-4)  # the perturbations' known norms
    assert torch.allclose(torch.tensor(list(done.norms.values()), dtype=torch.float64), norms, rtol=1e-6)
    assert torch.allclose(done.coefficients.per_adapter, c, rtol=1e-6)
    inner = torch.tensor([[sum(float((a[n] * b[n]).sum()) for n in a) for b in taus] for a in taus], dtype=torch.float64)
    assert torch.allclose(done.gram.adapter_inner, inner, rtol=1e-6, atol=1e-9)
    merged = tensors(tmp_path / "out")
    assert merged.keys() == w0.keys()
    for name, w in w0.items():
        expected = w + sum(ck * tau[name] for ck, tau in zip(c, taus))
        assert torch.allclose(merged[name], expected, atol=2e-6, rtol=1e-6), name
    # the base's layout: shard files, index, dtypes, tokenizer and config copied; a record and a card beside them
    assert sorted(p.name for p in base.glob("*.safetensors")) == sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == TOKENIZER
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    assert list(record["coefficients"]["per_adapter"].values()) == pytest.approx(c.tolist(), rel=1e-6)
    assert [e["kind"] for e in record["inputs"]] == ["full"] * 3 and "library_name: transformers" in (tmp_path / "out" / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reference_model = BUILDERS[arch]()
    reference_model.load_state_dict({n: (w + sum(ck * tau[n] for ck, tau in zip(c, taus))).float() for n, w in w0.items()}, strict=False)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids()).logits, reference_model(input_ids()).logits, atol=1e-4)


def test_module_granularity_and_ties_against_reference(models, tmp_path):
    base, fts = models[LLAMA]
    done = merge_checkpoints(base, fts[:2], tmp_path / "m", MergeSpec(granularity="module", method="ties", density=0.4))
    w0, taus, _, _ = reference(base, fts[:2])
    merged = tensors(tmp_path / "m")
    for m, name in enumerate(done.gram.modules):
        n = torch.tensor([float(tau[name].norm()) for tau in taus], dtype=torch.float64)
        c = (1 / n) / (1 / n).sum()
        assert torch.allclose(done.coefficients.values[m], c, rtol=1e-6)
        # TIES from the paper: trim to the top 40% magnitudes, elect the sign of sum_k c_k tau_k, mean over agreeing |c_k|
        trimmed = []
        for tau in taus:
            flat = tau[name].flatten()
            keep = flat.abs().topk(int(0.4 * flat.numel())).indices
            trimmed.append(torch.zeros_like(flat).index_copy_(0, keep, flat[keep]))
        weighted = torch.stack([ck * t for ck, t in zip(c, trimmed)])
        agree = (weighted.sign() == weighted.sum(0).sign()) & (torch.stack(trimmed) != 0)
        expected = (weighted * agree).sum(0) / (c[:, None] * agree).sum(0).clamp_min(1e-300).where(agree.any(0), torch.ones(1, dtype=torch.float64))
        assert torch.allclose(merged[name].flatten(), w0[name].flatten() + expected, atol=2e-6), name


def test_spectral_rule_on_matrices_and_task_arithmetic_on_vectors(models, tmp_path):
    base, fts = models[GPT2]
    merge_checkpoints(base, fts[:2], tmp_path / "iso", MergeSpec(method="iso_c", weights=(0.7, 0.3)))
    w0, taus, _, c = reference(base, fts[:2], weights=(0.7, 0.3))
    merged = tensors(tmp_path / "iso")
    for name, w in w0.items():
        total = sum(ck * tau[name] for ck, tau in zip(c, taus))
        if total.dim() == 2:  # Iso-C: the singular values of sum_k c_k tau_k replaced by their mean
            u, s, vh = torch.linalg.svd(total, full_matrices=False)
            total = s.mean() * u @ vh
        assert torch.allclose(merged[name], w + total, atol=5e-6), name


RULE_OPTIONS = {"ties": {"density": 0.5}, "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5}, "magnitude_prune": {"density": 0.5},
                "knots_ties": {"density": 0.5}, "knots_dare": {"density": 0.5}, "iso_cts": {"common": 0.5}}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_per_tensor(models, tmp_path, rule):
    """Each rule of nan_peft.rules, applied tensor by tensor to the float64 task vectors (seeded per tensor name, a
    1-D tensor under a spectral rule by the weighted sum), is what the streamed merge writes."""
    base, fts = models[GPT2]
    options = RULE_OPTIONS.get(rule, {})
    merge_checkpoints(base, fts[:2], tmp_path / rule, MergeSpec(method=rule, weights=(0.6, 0.4), **options))
    w0, taus, _, c = reference(base, fts[:2], weights=(0.6, 0.4))
    merged = tensors(tmp_path / rule)
    for name, w in w0.items():
        stack = torch.stack([tau[name] for tau in taus])
        if rule in SPECTRAL and stack.dim() == 2:
            expected = (c[:, None] * stack).sum(0)
        else:
            generator = module_generator(0, name) if rule in RANDOM else None
            expected = RULES[rule](stack, c, generator, **options)
        scale = max(float(expected.abs().max()), 1e-3)
        assert float((merged[name] - w - expected).abs().max()) < 1e-4 * scale + 2e-6, (rule, name)  # float32 vs float64 SVDs


def test_mixed_lora_and_full_inputs_match_peft(models, tmp_path):
    base, fts = models[GPT2]
    lora = make_adapter(tmp_path / "lora", base=GPT2, seed=9, magnitude=0.1, target_modules=["c_attn", "c_fc"])
    done = merge_checkpoints(base, [fts[0], lora], tmp_path / "mixed")
    # the LoRA's task vector as peft applies it: merge_and_unload onto the base, minus the base
    unloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), lora).merge_and_unload()
    w0 = tensors(base)
    full = {n: t - w0[n] for n, t in tensors(fts[0]).items()}
    state = unloaded.state_dict()
    lora_tau = {n: state[n].double() - w for n, w in w0.items()}
    norms = torch.tensor([math.sqrt(sum(float(t.square().sum()) for t in tau.values())) for tau in (full, lora_tau)], dtype=torch.float64)
    c = (1 / norms) / (1 / norms).sum()
    assert torch.allclose(done.coefficients.per_adapter, c, rtol=1e-5)
    assert sum(bool(t.any()) for t in lora_tau.values()) == len(done.plan.sources[1].modules) == 4
    merged = tensors(tmp_path / "mixed")
    for name, w in w0.items():
        assert torch.allclose(merged[name], w + c[0] * full[name] + c[1] * lora_tau[name], atol=2e-6), name


def test_vocab_refused_by_default_base_and_union(models, tmp_path):
    base, fts = models[LLAMA]
    grown = fine_tune(tiny_llama, tmp_path / "grown", seed=7, norm=1.0, rows=100)
    (grown / "tokenizer.json").write_text('{"grown": true}')
    with pytest.raises(NanPeftError, match=r"(model.embed_tokens|lm_head).weight is 100x32 but the base's is 96x32 \(a resized vocabulary: --vocab"):
        merge_checkpoints(base, [fts[0], grown], tmp_path / "no")
    assert not (tmp_path / "no").exists()
    w0, g, f = tensors(base), tensors(grown), tensors(fts[0])
    spec = MergeSpec(weights=(0.5, 0.5))
    merge_checkpoints(base, [fts[0], grown], tmp_path / "base", spec, vocab="base")
    kept = tensors(tmp_path / "base")
    name = "model.embed_tokens.weight"
    assert torch.allclose(kept[name], w0[name] + 0.5 * (f[name] - w0[name]) + 0.5 * (g[name][:96] - w0[name]), atol=2e-6)
    merge_checkpoints(base, [fts[0], grown], tmp_path / "union", spec, vocab="union")
    union = tensors(tmp_path / "union")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert union[name].shape == (100, 32) and torch.allclose(union[name][:96], kept[name], atol=1e-6)
        assert torch.allclose(union[name][96:], g[name][96:], atol=1e-6)  # one donor: its rows (mergekit's convention)
    assert json.loads((tmp_path / "union" / "config.json").read_text())["vocab_size"] == 100
    assert (tmp_path / "union" / "tokenizer.json").read_text() == '{"grown": true}'
    AutoModelForCausalLM.from_pretrained(tmp_path / "union")


def test_cli_merge_and_norms(models, tmp_path):
    base, fts = models[LLAMA]
    args = ["merge", "--base", str(base), *map(str, fts), "-o", str(tmp_path / "cli"), "--method", "dare_linear", "--density", "0.5",
            "--weights", "0.5,0.3,0.2", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert [i["kind"] for i in document["inputs"]] == ["full"] * 3 and "merge_record.json" in document["files"]
    record = json.loads((tmp_path / "cli" / "merge_record.json").read_text())
    assert record["options"]["method"] == "dare_linear" and record["norms"] == pytest.approx(dict(zip(["ft0", "ft1", "ft2"], [0.5, 2.0, 1.2])), rel=1e-4)
    again = CliRunner().invoke(cli, record["command"][1:] + ["--force"])  # the recorded command writes the same bytes
    assert again.exit_code == 0, again.stderr
    norms = CliRunner().invoke(cli, ["norms", "--base", str(base), *map(str, fts), "--json"])
    assert norms.exit_code == 0, norms.stderr
    shown = json.loads(norms.stdout)
    assert [a["norm"] for a in shown["adapters"]] == pytest.approx([0.5, 2.0, 1.2], rel=1e-4)
    assert torch.allclose(torch.tensor(shown["inner_products"]), torch.tensor(record["inner_products"]))
    refused = CliRunner().invoke(cli, ["merge", "--base", str(base), str(fts[0]), "-o", str(tmp_path / "x"), "--serve", "vllm"])
    assert refused.exit_code == 1 and "--serve does not apply" in refused.stderr and not (tmp_path / "x").exists()


def _write(folder, tensors_by_file, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors_by_file, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_bad_inputs_one_line_nothing_written(models, tmp_path):
    base, fts = models[LLAMA]
    config = json.loads((fts[1] / "config.json").read_text())
    state = tensors(fts[1], torch.float32)
    nan = dict(state)
    nan["model.norm.weight"] = nan["model.norm.weight"].clone()
    nan["model.norm.weight"][3] = float("nan")
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    narrow = tmp_path / "narrow"
    tiny = tiny_llama().config.to_dict()
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{**tiny, "intermediate_size": 40})).save_pretrained(narrow)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    torch.save(state, pickled / "pytorch_model.bin")
    cases = {
        ".bin weights": (pickled, r"no model.safetensors .*found pytorch_model.bin.*needs safetensors"),
        "different architecture": (models[GPT2][1][0], r"model_type 'gpt2' but the base .* has 'llama'"),
        "missing tensor": (_write(tmp_path / "missing", missing, config), r"no tensor model.layers.1.mlp.up_proj.weight, which the base has"),
        "NaN": (_write(tmp_path / "nan", nan, config), r"tensor model.norm.weight holds NaN or Inf"),
        "base not matching by shape": (narrow, r"is 40x32 but the base's is 48x32: not a fine-tune of this base"),
    }
    for what, (ft, message) in cases.items():
        result = CliRunner().invoke(cli, ["merge", "--base", str(base), str(fts[0]), str(ft), "-o", str(tmp_path / "out")])
        assert result.exit_code == 1, what
        assert len(result.stderr.strip().splitlines()) == 1 and __import__("re").search(message, result.stderr), (what, result.stderr)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*")), what
    result = CliRunner().invoke(cli, ["merge", str(fts[0]), str(fts[1]), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "needs the base model they were fine-tuned from: --base BASE" in result.stderr


PEAK = """
import sys, torch
from pathlib import Path
from nan_peft.full import merge_checkpoints
from nan_peft.spec import MergeSpec
torch.ones(1) + 1  # torch's own start-up memory before the baseline
def status(key):  # kB; VmHWM is this process's own peak (getrusage's ru_maxrss would carry pytest's across exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
root = Path(sys.argv[1])
for rule in ("task_arithmetic", "ties"):
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    merge_checkpoints(root / "base", [root / f"ft{k}" for k in range(3)], root / rule, MergeSpec(method=rule, density=0.5 if rule == "ties" else None))
    print(rule, (status("VmHWM") - before) / 1024)
"""


def test_peak_memory_stays_a_few_tensors(tmp_path):
    """8 tensors of 4 MiB a checkpoint, 3 fine-tunes and the base: 128 MiB of inputs; the merge's peak stays a few tensors."""
    generator = torch.Generator().manual_seed(0)
    config = {"model_type": "synthetic", "architectures": ["Synthetic"]}
    w0 = {f"layers.{i}.weight": torch.randn(1024, 1024, generator=generator) for i in range(8)}
    _write(tmp_path / "base", w0, config)
    for k in range(3):
        _write(tmp_path / f"ft{k}", {n: w + 0.01 * torch.randn(w.shape, generator=generator) for n, w in w0.items()}, config)
    del w0
    # glibc keeps freed blocks under 32 MiB in its heap (its dynamic mmap threshold), so that RSS would count memory
    # already freed; real model tensors are larger and are mapped and unmapped. Pinning the threshold lets RSS count
    # what is live, as it does for real-sized tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = dict(line.split() for line in out.stdout.strip().splitlines())
    # MiB above the baseline, in 4 MiB tensors, of the 32 the inputs hold: task arithmetic holds W_0, the K task
    # vectors (the update accumulates in them), a read buffer and the written tensor, K + 3 (measured: 7.3); TIES
    # adds the dense rule's own temporaries (top-k indices, masks, weighted copies: measured 19)
    assert float(peaks["task_arithmetic"]) < 9 * 4, peaks
    assert float(peaks["ties"]) < 24 * 4, peaks


def test_gram_alone_and_plan_checks(models):
    base, fts = models[GPT2]
    plan = read_plan(base, fts)
    gram = task_vector_gram(plan)
    assert gram.adapter_norms.tolist() == pytest.approx([0.5, 2.0, 1.2], rel=1e-4)
    assert gram.modules == tuple(plan.tensors) and gram.present.all()
    with pytest.raises(NanPeftError, match="the base model itself"):
        read_plan(base, [base, fts[0]])
    with pytest.raises(NanPeftError, match="rank and the truncation options do not apply"):
        merge_checkpoints(base, fts, base.parent / "never", MergeSpec(combine="svd", rank=4))
    with pytest.raises(NanPeftError, match="--dtype does not apply"):
        merge_checkpoints(base, fts, base.parent / "never", MergeSpec(dtype="float16"))
    assert not (base.parent / "never").exists()
