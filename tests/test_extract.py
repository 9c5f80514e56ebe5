"""nan-peft extract: the LoRA of a full fine-tune, against a dense float64 SVD written from the math (Eckart-Young)
and through peft (the adapter on the base gives the fine-tune's logits when the rank suffices)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file, save_file

from nan_peft import NanPeftError
from nan_peft.cli import cli
from nan_peft.extract import EXTRACT_RECORD_NAME, extract_lora, selected

from models import input_ids, tiny_gpt2, tiny_llama

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def perturbed(kind: str, folder: Path, seed: int, true_rank: int | None, only: str | None = None) -> dict[str, torch.Tensor]:
    """Save the base model `kind` plus tau at every 2-D weight (matching `only`) to `folder`: tau of rank
    `true_rank` (None: full rank), in float32; return {tensor name: tau as stored, float64}."""
    model, generator, taus = BUILD[kind](), torch.Generator().manual_seed(seed), {}
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() != 2 or (only and only not in name):
                continue
            m, n = weight.shape
            if true_rank is None:
                tau = torch.randn(m, n, generator=generator, dtype=torch.float64) * 0.05
            else:
                tau = torch.randn(m, true_rank, generator=generator, dtype=torch.float64) @ torch.randn(true_rank, n, generator=generator, dtype=torch.float64)
                tau *= 0.05 / math.sqrt(true_rank)
            before = weight.detach().double().clone()
            weight.add_(tau.float())
            taus[name] = weight.detach().double() - before
    model.save_pretrained(folder)
    return taus


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    for kind in BUILD:
        BUILD[kind]().save_pretrained(root / f"{kind}-base")
    taus = {
        "llama-low": perturbed("llama", root / "llama-low", 1, 2),
        "gpt2-low": perturbed("gpt2", root / "gpt2-low", 2, 2),
        "llama-full": perturbed("llama", root / "llama-full", 3, None),
        "llama-other": perturbed("llama", root / "llama-other", 4, 3),
    }
    return root, taus


def lora_update(folder: Path, module: str) -> torch.Tensor:
    """B A of `module` in the written adapter, float64, as peft stores it (Embedding: lora_embedding_*)."""
    state = load_file(folder / "adapter_model.safetensors")
    prefix = f"base_model.model.{module}."
    if f"{prefix}lora_A.weight" in state:
        return state[f"{prefix}lora_B.weight"].double() @ state[f"{prefix}lora_A.weight"].double()
    return state[f"{prefix}lora_embedding_B"].double() @ state[f"{prefix}lora_embedding_A"].double()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def extract(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["extract", *map(str, args), "--quiet"], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_low_rank_task_vectors_are_reproduced_and_peft_gives_the_fine_tune(models, kind):
    root, taus = models
    out = root / f"{kind}-low-adapter"
    code, stdout, stderr = extract(root / f"{kind}-low", "--base", root / f"{kind}-base", "-o", out, "--rank", 4, "--json")
    assert code == 0, stderr
    record = json.loads(stdout)
    assert record == {**json.loads((out / EXTRACT_RECORD_NAME).read_text()), "output": str(out), "files": record["files"]}
    assert record["rank"] == 4 and record["left_out"] == [] and record["relative_discarded"] < 1e-6
    config = json.loads((out / "adapter_config.json").read_text())
    by_module = {entry["module"]: entry for entry in record["modules"]}
    for name, tau in taus[f"{kind}-low"].items():
        module = name.removesuffix(".weight")
        update = lora_update(out, module)
        # peft's layouts: Linear B A = tau; Conv1D (in, out: all of GPT-2's) and Embedding (num, dim) B A = tau^T
        expected = tau.T if kind == "gpt2" or "embed" in name else tau
        assert torch.allclose(update, expected, atol=1e-6 * tau.abs().max()), name
        assert by_module[module]["discarded"] <= 1e-6 * by_module[module]["norm"]
        assert math.isclose(by_module[module]["norm"], float(tau.norm()), rel_tol=1e-9)
    if kind == "gpt2":  # the tied output layer gets the embedding's task vector as a Linear LoRA
        assert torch.allclose(lora_update(out, "lm_head"), taus["gpt2-low"]["transformer.wte.weight"], atol=1e-7)
        assert config["fan_in_fan_out"] is True
    base = BUILD[kind]()
    fine_tune = type(base).from_pretrained(root / f"{kind}-low").eval()
    assert (logits(base) - logits(fine_tune)).abs().max() > 1e-2  # the fine-tune moves the logits
    adapted = PeftModel.from_pretrained(base, out).eval()
    assert torch.allclose(logits(adapted), logits(fine_tune), atol=1e-5)


def test_discarded_norm_of_a_full_rank_task_vector_matches_a_dense_float64_svd(models):
    root, taus = models
    for truncation, tolerance in (("exact", 1e-9), ("randomized", 1e-3)):
        out = root / f"full-{truncation}"
        code, _, stderr = extract(root / "llama-full", "--base", root / "llama-base", "-o", out, "--rank", 3, "--truncation", truncation)
        assert code == 0, stderr
        record = json.loads((out / EXTRACT_RECORD_NAME).read_text())
        by_module = {entry["module"]: entry for entry in record["modules"]}
        for name, tau in taus["llama-full"].items():
            module, entry = name.removesuffix(".weight"), by_module[name.removesuffix(".weight")]
            U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
            optimal = float(S[3:].square().sum().sqrt())
            written = tau.T if "embed" in name else tau
            reported = float((written - lora_update(out, module)).norm())
            assert entry["rank"] == 3 and entry["truncation"] == ("dense" if truncation == "exact" else "randomized")
            assert math.isclose(entry["discarded"], reported, rel_tol=1e-9)  # the norm of what was written, exactly
            assert optimal * (1 - 1e-9) <= entry["discarded"] <= optimal * (1 + tolerance), (name, entry["discarded"], optimal)
            if truncation == "exact":
                best = (U[:, :3] * S[:3]) @ Vh[:3]
                assert torch.allclose(lora_update(out, module), best.T if "embed" in name else best, atol=1e-6 * float(S[0]))


def test_energy_picks_the_smallest_rank_keeping_that_fraction(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "base")
    U, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(32, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    S = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)  # energies 16, 4, 1, 0.25 of 21.25: 0.753, 0.941, 0.988, 1
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(((U * S) @ V.T).float())
    model.save_pretrained(tmp_path / "ft")
    for energy, rank in ((0.5, 1), (0.9, 2), (0.95, 3), (1.0, 4)):
        extraction = extract_lora(tmp_path / "ft", tmp_path / "base", energy=energy)
        (entry,) = extraction.report
        assert entry.module == "model.layers.0.self_attn.q_proj" and entry.rank == rank, energy
        assert math.isclose(entry.discarded, float(S[rank:].square().sum().sqrt()), rel_tol=1e-4, abs_tol=1e-6)
    assert extract_lora(tmp_path / "ft", tmp_path / "base", energy=0.9, rank=1).report[0].rank == 1  # --rank caps it
    assert extraction.unchanged == 15  # every other weight equals the base's


def test_modules_select_like_mergekit_include_and_exclude(models):
    assert selected("model.layers.0.self_attn.q_proj", ["self_attn", "!k_proj"])
    assert not selected("model.layers.0.self_attn.k_proj", ["self_attn", "!k_proj"])
    assert not selected("model.layers.0.mlp.up_proj", ["self_attn"]) and selected("model.layers.0.mlp.up_proj", ["!k_proj"])
    root, taus = models
    extraction = extract_lora(root / "llama-low", root / "llama-base", rank=2, modules=["self_attn", "!k_proj"])
    assert sorted(extraction.adapter.modules) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj"))
    left = {entry["tensor"]: entry for entry in extraction.left_out}
    assert set(left) == set(taus["llama-low"]) - {f"{m}.weight" for m in extraction.adapter.modules}
    assert left["lm_head.weight"]["why"] == "excluded by --modules"
    assert math.isclose(left["lm_head.weight"]["norm"], float(taus["llama-low"]["lm_head.weight"].norm()), rel_tol=1e-9)


def test_a_merge_of_extracted_adapters_is_their_weighted_sum(models):
    root, taus = models
    folders = []
    for name in ("llama-low", "llama-other"):
        folders.append(root / f"{name}-for-merge")
        assert extract(root / name, "--base", root / "llama-base", "-o", folders[-1], "--rank", 3, "--modules", "proj")[0] == 0
    result = CliRunner().invoke(cli, ["merge", *map(str, folders), "-o", str(root / "merged"), "--json", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    c = [adapter["coefficient"] for adapter in document["adapters"]]
    module = "model.layers.1.mlp.down_proj"
    expected = sum(ck * taus[name][f"{module}.weight"] for ck, name in zip(c, ("llama-low", "llama-other")))
    assert torch.allclose(lora_update(root / "merged", module), expected, atol=1e-6)


def _without(source: Path, target: Path, edit) -> Path:
    """A copy of the checkpoint `source` with its tensors edited by edit(state) (in place)."""
    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    state = load_file(source / "model.safetensors")
    edit(state)
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_bad_input_is_one_line_and_writes_nothing(models, tmp_path):
    root, _ = models
    ft, base = root / "llama-low", root / "llama-base"
    missing = _without(base, tmp_path / "missing", lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    resized = _without(base, tmp_path / "resized", lambda s: s.update({"lm_head.weight": torch.zeros(97, 32)}))
    nan = _without(ft, tmp_path / "nan", lambda s: s["model.layers.0.self_attn.v_proj.weight"].view(-1).__setitem__(3, float("nan")))
    cases = {
        "missing base tensor": ([ft, "--base", missing, "--rank", 2], "model.layers.1.mlp.up_proj.weight"),
        "shape mismatch": ([ft, "--base", resized, "--rank", 2], "lm_head.weight"),
        "NaN": ([nan, "--base", base, "--rank", 2], "NaN"),
        "different architecture": ([ft, "--base", root / "gpt2-base", "--rank", 2], "not a fine-tune of this base"),
        "rank < 1": ([ft, "--base", base, "--rank", 0], "rank"),
        "energy 0": ([ft, "--base", base, "--energy", 0], "energy"),
        "energy > 1": ([ft, "--base", base, "--energy", 1.5], "energy"),
        "neither": ([ft, "--base", base], "--rank"),
        "bad regex": ([ft, "--base", base, "--rank", 2, "--modules", "(proj"], "regular expression"),
        "no module matches": ([ft, "--base", base, "--rank", 2, "--modules", "nothing"], "matches none"),
    }
    for label, (args, needle) in cases.items():
        out = tmp_path / "out"
        code, _, stderr = extract(*args, "-o", out)
        assert code != 0 and stderr.count("\n") == 1 and stderr.startswith("error:") and needle in stderr, (label, stderr)
        assert not out.exists() and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()), label
    with pytest.raises(NanPeftError, match="energy"):
        extract_lora(ft, base, energy=-0.1)


def test_left_out_norms_are_read_a_block_at_a_time(models, monkeypatch):
    """A left-out tensor's norm from TensorReader.blocks (never the whole tensor): the same as whole, block sizes aside."""
    import nan_peft.extract as extract_module
    from nan_peft.fold.checkpoint import TensorReader, read_checkpoint

    root, taus = models
    monkeypatch.setattr(extract_module, "_BLOCK", 1000)  # the embeddings' 3072 entries in 4 blocks, the last short
    extraction = extract_lora(root / "llama-low", root / "llama-base", rank=2, modules=["!embed_tokens|lm_head"])
    left = {entry["tensor"]: entry["norm"] for entry in extraction.left_out}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert math.isclose(left[name], float(taus["llama-low"][name].norm()), rel_tol=1e-9)
    with TensorReader(read_checkpoint(root / "llama-low")) as reader:
        assert torch.equal(torch.cat(list(reader.blocks("lm_head.weight", 1000))), reader.read("lm_head.weight").reshape(-1))
