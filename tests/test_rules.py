"""Merge rules against dense references written from the papers' definitions, entry by entry."""

import pytest
import torch

from models import LLAMA
from nan_peft import NanPeftError, merge_adapters
from nan_peft.rules import RULES, module_generator
from oracle import load_sources, peft_deltas


def trimmed(delta, density):
    """TIES step 1: keep the top int(density * n) magnitudes of one task vector."""
    flat = delta.flatten()
    keep = int(density * flat.numel())
    out = torch.zeros_like(flat)
    order = sorted(range(flat.numel()), key=lambda i: -abs(float(flat[i])))[:keep]
    for i in order:
        out[i] = flat[i]
    return out.reshape(delta.shape)


def disjoint(taus, weights, normalize=True):
    """TIES steps 2 and 3 with coefficients: elect the sign of sum_k w_k tau_k, then the |w_k|-weighted mean of
    the agreeing entries, sum_agree w_k tau_k / sum_agree |w_k| (a negative weight keeps its negation)."""
    shape = taus[0].shape
    flats = [t.flatten() for t in taus]
    out = torch.zeros(flats[0].numel(), dtype=torch.float64)
    for p in range(out.numel()):
        values = [w * float(t[p]) for w, t in zip(weights, flats)]
        total = sum(values)
        gamma = (total > 0) - (total < 0)
        agree = [k for k, v in enumerate(values) if float(flats[k][p]) != 0 and ((v > 0) - (v < 0)) == gamma]
        if agree:
            out[p] = sum(values[k] for k in agree) / (sum(abs(weights[k]) for k in agree) if normalize else 1.0)
    return out.reshape(shape)


def random_deltas(K=3, m=6, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, m, n, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_paper(density, normalize):
    deltas, weights = random_deltas(), [0.5, 0.3, 0.2]
    expected = disjoint([trimmed(d, density) for d in deltas], weights, normalize)
    got = RULES["ties"](deltas, torch.tensor(weights, dtype=torch.float64), None, density=density, normalize=normalize, scale=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    scaled = RULES["ties"](deltas, torch.tensor(weights, dtype=torch.float64), None, density=density, normalize=normalize, scale=0.7)
    torch.testing.assert_close(scaled, 0.7 * expected, rtol=1e-12, atol=1e-12)


def test_ties_degenerate_cases():
    deltas = random_deltas().abs()  # all signs equal: the weighted mean of all entries (density 1)
    w = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    torch.testing.assert_close(RULES["ties"](deltas, w, None, density=1.0), (w[:, None, None] * deltas).sum(0) / w.sum())
    one = random_deltas(K=1)  # a single update survives TIES unchanged but for trimming
    torch.testing.assert_close(RULES["ties"](one, torch.tensor([0.4], dtype=torch.float64), None, density=0.5), trimmed(one[0], 0.5))



@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_trim_breaks_ties_in_index_order(dtype, density):
    """Whole-number updates tie at the threshold magnitude: the first tied entries are kept, exactly
    int(density * numel) of them in all, whether the threshold comes from numpy (float32/64 on the CPU) or topk."""
    from nan_peft.rules.family import trim_magnitude

    deltas = torch.randint(-3, 4, (3, 7, 9), generator=torch.Generator().manual_seed(1)).to(dtype)
    got = trim_magnitude(deltas, density)
    for d, g in zip(deltas, got):
        assert torch.equal(g.double(), trimmed(d.double(), density))

@pytest.mark.parametrize("density", [0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference_with_mixed_sign_weights(density, normalize):
    deltas, weights = random_deltas(K=4, seed=6), [1.0, -0.9, 0.3, -0.05]
    expected = disjoint([trimmed(d, density) for d in deltas], weights, normalize)
    got = RULES["ties"](deltas, torch.tensor(weights, dtype=torch.float64), None, density=density, normalize=normalize)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _one_module_adapters(K, seed=0, m=6, n=10, r=4):
    from nan_peft import LoraAdapter, LoraModule

    g = torch.Generator().manual_seed(seed)
    factors = [(torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64)) for _ in range(K)]
    adapters = [LoraAdapter(f"a{k}", "", {}, {"m": LoraModule(A, B, 0.5)}) for k, (A, B) in enumerate(factors)]
    return adapters, [0.5 * (B @ A) for A, B in factors]  # dense float64 dW_k = s_k B_k A_k


def _merged(result):
    mod = result.adapter.modules["m"]
    return mod.scale * (mod.B.double() @ mod.A.double())


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_negative_weight_negates_under_sign_consensus(method):
    """Task negation: one adapter with coefficient -1 gives -dW (a signed divisor gave +dW back)."""
    adapters, (dW,) = _one_module_adapters(1)
    result = merge_adapters(adapters, coefficients=[-1.0], method=method, density=1.0, rank=6, dtype=torch.float64)
    torch.testing.assert_close(_merged(result), -dW, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_mixed_sign_weights_do_not_inflate(method):
    """Weights [1, -0.9]: where both agree the signed divisor was 1 - 0.9 = 0.1 (a 10x blow-up). Now each entry
    is the |c_k|-weighted mean of the agreeing sign(c_k) dW_k (the dense reference), so it lies within
    max_k |dW_k| entrywise. (Not always within max_k |c_k dW_k| entrywise: where both agree the result is
    (|c_1 dW_1| + |c_2 dW_2|) / 1.9, up to 2/1.9 = 1.05 times the larger term.)"""
    adapters, dWs = _one_module_adapters(2)
    weights = [1.0, -0.9]
    result = merge_adapters(adapters, coefficients=weights, method=method, density=1.0, rank=6, dtype=torch.float64)
    got = _merged(result)
    torch.testing.assert_close(got, disjoint(dWs, weights), rtol=1e-10, atol=1e-10)
    assert (got.abs() <= torch.stack(dWs).abs().amax(0) + 1e-10).all()
    # the bug this guards against: the signed divisor inflated the agreeing entries 10x past that bound
    weighted = torch.stack([w * d for w, d in zip(weights, dWs)])
    both = weighted[0].sign() == weighted[1].sign()
    signed = torch.where(both, weighted.sum(0) / 0.1, got)
    assert signed.abs().max() > 3 * torch.stack(dWs).abs().max()


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_magnitude_prune_matches_definition(density):
    deltas, weights = random_deltas(seed=2), [1.0, -0.5, 2.0]
    expected = sum(w * trimmed(d, density) for w, d in zip(weights, deltas))
    got = RULES["magnitude_prune"](deltas, torch.tensor(weights, dtype=torch.float64), None, density=density)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_is_scaled_weighted_sum():
    deltas, weights = random_deltas(seed=3), [0.2, 0.3, 0.5]
    expected = 0.8 * sum(w * d for w, d in zip(weights, deltas))
    torch.testing.assert_close(RULES["task_arithmetic"](deltas, torch.tensor(weights, dtype=torch.float64), None, scale=0.8), expected)


def dare_mask(seed, module, shape, density):
    return torch.rand(shape, generator=module_generator(seed, module), dtype=torch.float64) < density


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_matches_definition_with_its_mask(name):
    deltas, weights, density = random_deltas(seed=4), [0.5, 0.25, 0.25], 0.4
    keep = dare_mask(7, "layer", deltas.shape, density)
    rescaled = [d * k / density for d, k in zip(deltas, keep)]
    if name == "dare_linear":
        expected = sum(w * d for w, d in zip(weights, rescaled))
    else:
        expected = disjoint(rescaled, weights)
    got = RULES[name](deltas, torch.tensor(weights, dtype=torch.float64), module_generator(7, "layer"), density=density)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dare_is_unbiased():
    delta = random_deltas(K=1, m=200, n=200, seed=5)
    dropped = RULES["dare_linear"](delta, torch.tensor([1.0], dtype=torch.float64), module_generator(0, "x"), density=0.25)
    kept = dropped != 0
    assert kept.double().mean().item() == pytest.approx(0.25, abs=0.01)
    torch.testing.assert_close(dropped[kept], delta[0][kept] / 0.25)


@pytest.fixture(scope="module")
def deltas(llama_adapters):
    return peft_deltas(load_sources(LLAMA, llama_adapters))


def stacked(deltas, module, coefficients):
    present = sorted((int(n[1:]), d) for n, d in deltas[module].items() if coefficients[int(n[1:])] != 0)
    return [d for _, d in present], [coefficients[k] for k, _ in present]


def merged_update(result, module):
    m = result.adapter.modules[module]
    return m.B.double() @ m.A.double()


@pytest.mark.parametrize("coefficients", ["nan", "uniform", [0.7, 0.1, 0.5, 0.2]])
def test_ties_pipeline_equals_reference_on_real_adapters(llama_adapters, deltas, coefficients):
    """Rank 32 >= every module's size, so the truncation back to LoRA is exact and the rule shows through."""
    result = merge_adapters(llama_adapters, coefficients=coefficients, method="ties", density=0.3, scale=1.5, rank=32)
    assert result.options["combine"] == "svd"
    for m, module in enumerate(result.coefficients.modules):
        taus, weights = stacked(deltas, module, result.coefficients.values[m].tolist())
        expected = 1.5 * disjoint([trimmed(t, 0.3) for t in taus], weights)
        torch.testing.assert_close(merged_update(result, module), expected, rtol=1e-6, atol=1e-6)
        assert next(r for r in result.report if r.module == module).discarded == pytest.approx(0.0, abs=1e-6)


def test_dense_rule_truncation_is_optimal_and_reported(llama_adapters, deltas):
    result = merge_adapters(llama_adapters, method="magnitude_prune", density=0.5, rank=3)
    for m, module in enumerate(result.coefficients.modules):
        taus, weights = stacked(deltas, module, result.coefficients.values[m].tolist())
        dense = sum(w * trimmed(t, 0.5) for w, t in zip(weights, taus))
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(merged_update(result, module), best, rtol=1e-6, atol=1e-6)
        report = next(r for r in result.report if r.module == module)
        assert report.discarded == pytest.approx(torch.linalg.norm(dense - best).item(), rel=1e-6)


def test_task_arithmetic_scale_is_exact_and_low_rank(llama_adapters):
    plain = merge_adapters(llama_adapters)
    scaled = merge_adapters(llama_adapters, method="task_arithmetic", scale=0.5)
    assert scaled.options["combine"] == "cat" and scaled.rank == plain.rank
    for module in plain.adapter.modules:
        torch.testing.assert_close(merged_update(scaled, module), 0.5 * merged_update(plain, module), rtol=1e-6, atol=1e-8)


def test_dare_seeded(llama_adapters):
    first = merge_adapters(llama_adapters, method="dare_ties", density=0.5, rank=8, seed=1)
    again = merge_adapters(llama_adapters, method="dare_ties", density=0.5, rank=8, seed=1)
    other = merge_adapters(llama_adapters, method="dare_ties", density=0.5, rank=8, seed=2)
    module = "model.layers.0.self_attn.q_proj"
    assert torch.equal(first.adapter.modules[module].A, again.adapter.modules[module].A)
    assert not torch.allclose(merged_update(first, module), merged_update(other, module))
    assert first.options["seed"] == 1


@pytest.mark.parametrize("options,message", [
    (dict(method="ties", rank=4), "ties rule: needs density"),
    (dict(method="ties", density=0.5), "svd needs a target rank"),
    (dict(method="ties", density=0.5, combine="cat"), "gives dense updates"),
    (dict(method="ties", density=1.5, rank=4), r"density must be in \(0, 1\]"),
    (dict(method="task_arithmetic", density=0.5), "task_arithmetic rule: no option density"),
    (dict(method="ties", density=0.5, rank=4, seed=3), "ties rule: no option seed"),
    (dict(method="slerp"), "unknown rule 'slerp'"),
])
def test_rule_option_errors(llama_adapters, options, message):
    with pytest.raises(NanPeftError, match=message):
        merge_adapters(llama_adapters, **options)


def test_dare_masks_do_not_depend_on_dtype(llama_adapters):
    """The fold computes in float32 and the svd merge in float64: the same seed must drop the same entries."""
    from nan_peft.combination import dense_updates

    result = merge_adapters(llama_adapters, method="dare_linear", density=0.5, rank=8, seed=3)
    options = {"density": 0.5, "seed": 3}
    wide = {p: u for p, _, u in dense_updates(result.sources, result.coefficients, "dare_linear", options)}
    narrow = {p: u for p, _, u in dense_updates(result.sources, result.coefficients, "dare_linear", options, dtype=torch.float32)}
    for path in wide:
        assert narrow[path].dtype == torch.float32
        torch.testing.assert_close(narrow[path].double(), wide[path], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,options", [("ties", {"density": 0.4, "scale": 1.2}), ("dare_ties", {"density": 0.5, "seed": 4}),
                                            ("magnitude_prune", {"density": 0.3}), ("task_arithmetic", {"scale": 0.5})])
def test_cli_recipe_and_python_give_the_same_bytes(llama_adapters, tmp_path, monkeypatch, method, options):
    """One registry behind the three front ends: --method, the recipe's method key and merge_adapters(method=)."""
    from click.testing import CliRunner

    from nan_peft.cli import cli

    monkeypatch.chdir(tmp_path)
    paths = [str(p) for p in llama_adapters]
    rank = {"task_arithmetic": None}.get(method, 8)
    merge_adapters(paths, method=method, rank=rank, **options).save_pretrained("py")
    flags = [f"--{k}={v}" for k, v in options.items()] + ([f"--rank={rank}"] if rank else [])
    assert CliRunner().invoke(cli, ["merge", *paths, "-o", "cli", "--method", method, *flags, "-q"]).exit_code == 0
    recipe = {"adapters": paths, "output": "recipe", "method": method, **options, **({"rank": rank} if rank else {})}
    import yaml

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert CliRunner().invoke(cli, ["merge", "--config", "recipe.yaml", "-q"]).exit_code == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        expected = (tmp_path / "py" / name).read_bytes()
        assert (tmp_path / "cli" / name).read_bytes() == expected and (tmp_path / "recipe" / name).read_bytes() == expected
