"""Merging against independent references: peft's own dense updates, dense SVD, and peft's forward pass."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from models import BASES, GPT2, LLAMA, input_ids, make_adapter
from nan_peft import NanPeftError, merge_adapters, read_adapters, update_gram
from oracle import load_sources, lora_layers, peft_deltas, scale_sources


@pytest.fixture(scope="module")
def llama_deltas(llama_adapters):
    return peft_deltas(load_sources(LLAMA, llama_adapters))


def dense_norms(deltas, K):
    squares = torch.zeros(K, dtype=torch.float64)
    for per_adapter in deltas.values():
        for name, delta in per_adapter.items():
            squares[int(name[1:])] += delta.square().sum()
    return squares.sqrt()


def expected_update(deltas, module, coefficients):
    """sum_k c_k dW_k at a module, from peft's dense updates."""
    return sum(coefficients[k] * delta for k, delta in ((int(n[1:]), d) for n, d in deltas[module].items()))


def merged_update(result, module):
    m = result.adapter.modules[module]
    return m.scale * (m.B.double() @ m.A.double())


def test_gram_norms_and_inner_products_equal_dense(llama_adapters, llama_deltas):
    gram = update_gram(read_adapters(llama_adapters))
    torch.testing.assert_close(gram.adapter_norms, dense_norms(llama_deltas, 4), rtol=1e-6, atol=0)
    for m, module in enumerate(gram.modules):
        present = {int(n[1:]): d for n, d in llama_deltas[module].items()}
        assert gram.present[m].tolist() == [k in present for k in range(4)]
        for i in range(4):
            for j in range(4):
                expected = float((present[i] * present[j]).sum()) if i in present and j in present else 0.0
                assert gram.inner[m, i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_nan_coefficients_follow_the_paper(llama_adapters, llama_deltas):
    result = merge_adapters(llama_adapters)
    inverse = 1 / dense_norms(llama_deltas, 4)
    expected = inverse / inverse.sum()
    torch.testing.assert_close(result.coefficients.per_adapter, expected, rtol=1e-6, atol=0)
    assert result.coefficients.per_adapter.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert list(result.norms) == ["plain", "patterns", "rslora", "layer1"]


@pytest.mark.parametrize("options", [
    dict(),
    dict(exponent=2.0, total=3.0),
    dict(granularity="module"),
    dict(coefficients="uniform"),
    dict(coefficients="uniform", granularity="module", total=2.0),
    dict(coefficients=[0.5, -1.0, 2.0, 0.25]),
])
def test_cat_merge_equals_dense_weighted_sum(llama_adapters, llama_deltas, options):
    result = merge_adapters(llama_adapters, combine="cat", **options)
    values = result.coefficients.values
    norms = result.gram.module_norms
    for m, module in enumerate(result.coefficients.modules):
        c = values[m].tolist()
        torch.testing.assert_close(merged_update(result, module), expected_update(llama_deltas, module, c), rtol=1e-5, atol=1e-7)
        present = [k for k in range(4) if result.gram.present[m, k]]
        if options.get("granularity") == "module":
            assert sum(c) == pytest.approx(options.get("total", 1.0), rel=1e-12)
            if options.get("coefficients") != "uniform":
                inverse = [1 / norms[m, k].item() for k in present]
                assert [c[k] for k in present] == pytest.approx([options.get("total", 1.0) * v / sum(inverse) for v in inverse])
            else:
                assert [c[k] for k in present] == pytest.approx([options.get("total", 1.0) / len(present)] * len(present))
    if options.get("exponent") == 2.0:
        inverse = result.gram.adapter_norms ** -2
        torch.testing.assert_close(result.coefficients.per_adapter, 3.0 * inverse / inverse.sum())


def test_cat_rank_is_the_largest_sum_of_ranks(llama_adapters):
    result = merge_adapters(llama_adapters, combine="cat")
    # q_proj in layer 1: 4 (plain) + 8 (patterns) + 6 (rslora) + 2 (layer1)
    assert result.rank == 20
    report = {r.module: r for r in result.report}
    assert report["model.layers.1.self_attn.q_proj"].input_rank == 20
    assert report["model.layers.0.self_attn.v_proj"].input_rank == 4 + 2
    assert all(r.discarded == 0 for r in result.report)


@pytest.mark.parametrize("rank", [1, 3, 8, 24])
def test_svd_merge_equals_dense_truncation(llama_adapters, llama_deltas, rank):
    result = merge_adapters(llama_adapters, combine="svd", rank=rank, granularity="module")
    assert result.rank == rank
    for m, module in enumerate(result.coefficients.modules):
        dense = expected_update(llama_deltas, module, result.coefficients.values[m].tolist())
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
        torch.testing.assert_close(merged_update(result, module), best, rtol=1e-5, atol=1e-6)
        report = next(r for r in result.report if r.module == module)
        assert report.norm == pytest.approx(torch.linalg.norm(dense).item(), rel=1e-6)
        assert report.discarded == pytest.approx(torch.linalg.norm(dense - best).item(), rel=1e-5, abs=1e-6)


def test_svd_needs_rank_and_cat_refuses_truncation(llama_adapters):
    with pytest.raises(NanPeftError, match="svd needs a target rank"):
        merge_adapters(llama_adapters, combine="svd")
    with pytest.raises(NanPeftError, match="cat is exact and needs rank >= 20"):
        merge_adapters(llama_adapters, combine="cat", rank=8)
    assert merge_adapters(llama_adapters, combine="cat", rank=32).rank == 32
    with pytest.raises(NanPeftError, match="unknown combine"):
        merge_adapters(llama_adapters, combine="ties")


@pytest.mark.parametrize("options,message", [
    (dict(coefficients="manual"), "manual coefficients: needs weights"),
    (dict(coefficients="manual", weights=[1, 2]), "got 2 weights for 4 adapters"),
    (dict(coefficients="manual", weights=[1, 1, 1, 1], total=2), "manual coefficients: no option total"),
    (dict(coefficients="uniform", exponent=2), "uniform coefficients: no option exponent"),
    (dict(coefficients="nan", weights=[1, 1, 1, 1]), "nan coefficients: no option weights"),
    (dict(granularity="layer"), "unknown granularity"),
    (dict(total=0), "total must be positive"),
    (dict(exponent=float("nan")), "exponent must be a finite number"),
    (dict(coefficients=[0, 0, 0, 0]), "all weights are zero"),
    (dict(coefficients="best"), "unknown coefficients 'best'"),
    (dict(rank=0, combine="svd"), "rank must be a positive integer"),
])
def test_option_errors(llama_adapters, options, message):
    with pytest.raises(NanPeftError, match=message):
        merge_adapters(llama_adapters, **options)


def test_all_zero_update_is_refused_by_nan_only(tmp_path, llama_adapters):
    zero = make_adapter(tmp_path / "zero", magnitude=0.0)
    with pytest.raises(NanPeftError, match="adapter zero has an all-zero update"):
        merge_adapters([llama_adapters[0], zero])
    result = merge_adapters([llama_adapters[0], zero], coefficients="uniform")
    assert result.coefficients.per_adapter.tolist() == [0.5, 0.5]


def round_trip(base, sources, result, folder):
    """Logits of the merged adapter (loaded by peft) and of the sources applied together with scaled scalings."""
    result.save_pretrained(folder)
    merged = PeftModel.from_pretrained(BASES[base](), folder)
    model = load_sources(base, sources)
    names = [f"s{k}" for k in range(len(sources))]
    values = result.coefficients.values
    scale_sources(model, {
        path: dict(zip(names, values[result.coefficients.modules.index(path)].tolist()))
        for path in lora_layers(model)
    })
    ids = input_ids()
    with torch.no_grad():
        return merged(ids).logits, model(ids).logits, merged


@pytest.mark.parametrize("options", [dict(combine="cat"), dict(combine="svd", rank=20, granularity="module"), dict(coefficients=[1.0, -0.5, 0.7, 2.0])])
def test_peft_round_trip_llama(llama_adapters, tmp_path, options):
    result = merge_adapters(llama_adapters, **options)
    ours, reference, merged = round_trip(LLAMA, llama_adapters, result, tmp_path / "merged")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    base_logits = BASES[LLAMA]()(input_ids()).logits
    assert (reference - base_logits).abs().max() > 1e-2  # the adapters really change the output
    # every written tensor was loaded into the model; nothing missing
    state = load_file(tmp_path / "merged" / "adapter_model.safetensors")
    loaded = {k.replace(".default", "") for k in merged.state_dict() if "lora_" in k}
    assert {k for k in state if "lora_" in k} == loaded


def test_peft_round_trip_gpt2(gpt2_adapters, tmp_path):
    result = merge_adapters(gpt2_adapters, combine="cat", granularity="module")
    ours, reference, _ = round_trip(GPT2, gpt2_adapters, result, tmp_path / "merged")
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_written_config_is_servable(llama_adapters, tmp_path):
    result = merge_adapters(llama_adapters, combine="svd", rank=16)
    result.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 16
    assert config["use_rslora"] is False and config["use_dora"] is False and config["bias"] == "none"
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {} and not config["modules_to_save"]
    assert config["base_model_name_or_path"] == LLAMA and config["peft_type"] == "LORA"
    assert config["target_modules"] == sorted(result.adapter.modules)
    state = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in state.items() if "lora_A" in k or "lora_embedding_A" in k} == {16}


def test_written_config_is_what_peft_makes_of_it(llama_adapters, tmp_path):
    """The config is written without importing peft: every field must be one peft knows, with the value peft's
    own LoraConfig gives it, and the checked task types must be peft's."""
    from peft import LoraConfig, PeftConfig, TaskType

    from nan_peft.reader import TASK_TYPES

    assert set(TASK_TYPES) == {t.value for t in TaskType}
    merge_adapters(llama_adapters, combine="svd", rank=16).save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    def as_json(config):
        return {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in config.to_dict().items()}

    peft_dict = as_json(LoraConfig(**{k: v for k, v in written.items() if k != "peft_type"}))
    assert {k: peft_dict[k] for k in written} == written
    loaded = as_json(PeftConfig.from_pretrained(tmp_path / "out"))
    assert {k: loaded[k] for k in written} == written


def test_overwrite_needs_permission_and_replaces(llama_adapters, tmp_path):
    out = tmp_path / "out"
    merge_adapters(llama_adapters[:2]).save_pretrained(out)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(NanPeftError, match="already exists"):
        merge_adapters(llama_adapters[2:]).save_pretrained(out)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    merge_adapters(llama_adapters[2:]).save_pretrained(out, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_failed_write_leaves_nothing(llama_adapters, tmp_path):
    result = merge_adapters(llama_adapters[:2])
    with pytest.raises(TypeError):
        result.save_pretrained(tmp_path / "out", extra_files={"README.md": 42})
    assert list(tmp_path.iterdir()) == []


def test_same_bytes_on_repeated_runs(llama_adapters, tmp_path):
    for name in ("a", "b"):
        merge_adapters(llama_adapters, combine="svd", rank=8).save_pretrained(tmp_path / name)
    for file in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_dtypes(tmp_path, llama_adapters):
    bf16 = [make_adapter(tmp_path / f"bf{k}", seed=k, magnitude=0.1 * k, dtype=torch.bfloat16) for k in (1, 2)]
    result = merge_adapters(bf16, combine="svd", rank=4)
    assert {t.dtype for m in result.adapter.modules.values() for t in (m.A, m.B)} == {torch.bfloat16}
    mixed = merge_adapters([bf16[0], llama_adapters[0]], combine="cat")
    assert {t.dtype for m in mixed.adapter.modules.values() for t in (m.A, m.B)} == {torch.float32}
    deltas = peft_deltas(load_sources(LLAMA, [bf16[0], llama_adapters[0]]))
    c = mixed.coefficients.per_adapter.tolist()
    for module in mixed.adapter.modules:
        torch.testing.assert_close(merged_update(mixed, module), expected_update(deltas, module, c), rtol=1e-5, atol=1e-6)


def test_single_adapter_merge_is_the_adapter(llama_adapters, llama_deltas):
    result = merge_adapters(llama_adapters[1:2])
    assert result.coefficients.per_adapter.tolist() == [1.0]
    for module in result.adapter.modules:
        torch.testing.assert_close(merged_update(result, module), llama_deltas[module]["s1"], rtol=1e-5, atol=1e-7)


def test_python_options_read_like_the_command_line(llama_adapters):
    """weights= alone implies manual coefficients and dtype may be named, as on the command line; a dtype that
    is not a float type is refused before any reading."""
    by_name = merge_adapters(llama_adapters[:2], weights=[0.7, 0.3], dtype="bfloat16")
    explicit = merge_adapters(llama_adapters[:2], coefficients=[0.7, 0.3], dtype=torch.bfloat16)
    assert by_name.coefficients.method == "manual" and by_name.coefficients.per_adapter.tolist() == [0.7, 0.3]
    assert {t.dtype for m in by_name.adapter.modules.values() for t in (m.A, m.B)} == {torch.bfloat16}
    for path, module in explicit.adapter.modules.items():
        assert torch.equal(by_name.adapter.modules[path].B, module.B) and torch.equal(by_name.adapter.modules[path].A, module.A)
    for bad in (torch.int32, "int8", "double-ish"):
        with pytest.raises(NanPeftError, match="dtype must be a float type"):
            merge_adapters(["/nonexistent"], dtype=bad)


def _gram(norms, present):
    """An UpdateGram whose modules' norms are `norms` (M, K) with no cross terms."""
    from nan_peft.norms import UpdateGram

    norms = torch.tensor(norms, dtype=torch.float64)
    inner = torch.diag_embed(norms.square())
    M, K = norms.shape
    return UpdateGram(tuple(f"a{k}" for k in range(K)), tuple(f"m{m}" for m in range(M)), inner, torch.tensor(present))


def test_uniform_per_module_counts_every_adapter_present():
    """A module whose update is exactly zero (peft initialises B at zero) still counts for uniform coefficients,
    as it does per adapter: the other adapter's update is not doubled there."""
    from nan_peft.coefficients import nan_coefficients, uniform_coefficients

    gram = _gram([[1.0, 0.0], [1.0, 2.0], [3.0, 0.0]], [[True, True], [True, True], [True, False]])
    assert uniform_coefficients(gram, granularity="module").values.tolist() == [[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]]
    assert nan_coefficients(gram, granularity="module").values.tolist() == [[1.0, 0.0], [2 / 3, 1 / 3], [1.0, 0.0]]


@pytest.mark.parametrize("exponent", [400.0, 1000.0, -300.0])
def test_extreme_exponents_give_the_limit_not_nan(exponent):
    """n^-p over- or underflows float64 for large |p|: the coefficients are computed as a softmax of -p log n, so
    they stay finite, sum to total, and go to the limit (all weight on the smallest norm for p > 0, on the
    largest for p < 0); a module where one adapter is alone keeps it whole."""
    from nan_peft.coefficients import nan_coefficients

    gram = _gram([[8.6, 0.0], [8.6, 7.9]], [[True, False], [True, True]])
    values = nan_coefficients(gram, granularity="module", exponent=exponent, total=2.0).values
    assert torch.isfinite(values).all() and values[0].tolist() == [2.0, 0.0]
    assert values[1].tolist() == pytest.approx([0.0, 2.0] if exponent > 0 else [2.0, 0.0], abs=1e-10)  # (7.9/8.6)^300 = 9e-12
    per_adapter = nan_coefficients(gram, exponent=exponent).per_adapter
    assert torch.isfinite(per_adapter).all() and float(per_adapter.sum()) == pytest.approx(1.0)


def test_model_card_says_which_engines_serve_it(llama_adapters):
    """The card's serving sentence comes from the same findings as `nan-peft inspect`, for the rank written: an
    adapter restricted to some layers (layers_to_transform) is one LoRAX and TGI would serve differently from
    peft, and so is a rank their kernels pad (4 -> 8) unless written for them (16)."""
    from nan_peft.record import input_entry, merge_record, model_card

    cases = [(llama_adapters[:1], 16, "(vLLM, SGLang, LoRAX, TGI, TensorRT-LLM, llama.cpp) serve it as peft does"),
             (llama_adapters[:1], None, "but LoRAX, TGI would not serve it as peft does"),
             ([llama_adapters[0], llama_adapters[3]], 16, "but LoRAX, TGI would not serve it as peft does (`nan-peft inspect` says why); "
                                                          "vLLM, SGLang, TensorRT-LLM, llama.cpp serve it as is.")]
    for adapters, rank, says in cases:
        result = merge_adapters(adapters)
        record = merge_record(result, [input_entry(str(a), a, a.name) for a in adapters], ["nan-peft", "merge"], {})
        record["rank"] = rank or record["rank"]  # as the CLI records a rank padded by --serve
        assert says in model_card(result, record, "out")
