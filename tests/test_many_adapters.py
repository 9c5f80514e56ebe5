"""Many adapters: the randomized truncation (nan_peft/sketch.py) against the exact one, its seeded determinism, the
automatic choice of path at its boundaries, the dense path, the Grams of many adapters, and a randomized merge
loaded by peft. Small shapes only: seconds in all."""

import dataclasses
import importlib

import pytest
import torch
from peft import PeftModel

from models import BASES, LLAMA, input_ids
from nan_peft import NanPeftError, merge_adapters, update_gram
from nan_peft.coefficients import coefficients_for
from nan_peft.combination import combine
from nan_peft.truncation import (
    CORE_FLOPS, DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS, MIN_RANDOMIZED_RANK, RANDOMIZED_SAVING, truncation_path,
)
from nan_peft.lora import LoraAdapter, LoraModule
from nan_peft.sketch import factored, orthonormal_basis, randomized_svd, seeded_gaussians
from oracle import lora_layers, peft_deltas

truncation_module = importlib.import_module("nan_peft.truncation")

SHAPES = {"q": (48, 40), "down": (40, 72), "wide": (24, 96)}


def adapters_like(count, r=4, shapes=SHAPES, decay=None, seed=0):
    """`count` adapters of rank r with Gaussian factors; decay: B's columns scaled by decay**j (a decaying spectrum)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        modules = {}
        for path, (m, n) in shapes.items():
            A = torch.randn(r, n, generator=g, dtype=torch.float64) / n**0.5
            B = torch.randn(m, r, generator=g, dtype=torch.float64) * (1 + k % 3)
            if decay is not None:
                B = B * decay ** torch.arange(k * r, (k + 1) * r, dtype=torch.float64)
            modules[path] = LoraModule(A, B, 2.0)
        out.append(LoraAdapter(f"a{k}", "", {}, modules))
    return out


def merge(adapters, rank, **options):
    gram = update_gram(adapters)
    coefficients = coefficients_for("nan", gram)
    merged, report = combine(adapters, coefficients, gram, "svd", rank, dtype=torch.float64, **options)
    dense = {
        path: sum(float(coefficients.values[m, k]) * a.modules[path].delta() for k, a in enumerate(adapters) if path in a.modules)
        for m, path in enumerate(coefficients.modules)
    }
    return merged, {r.module: r for r in report}, dense


def product(module):
    return module.scale * (module.B.double() @ module.A.double())


def test_randomized_equals_exact_where_the_krylov_space_holds_the_spectrum():
    """A decaying spectrum: the randomized truncation is the optimum (to rounding), as the exact path computes it."""
    adapters = adapters_like(6, decay=0.7)
    exact, exact_report, dense = merge(adapters, 5, truncation="exact")
    randomized, report, _ = merge(adapters, 5, truncation="randomized", oversample=5, power_iterations=2)
    for path in SHAPES:
        assert report[path].truncation == "randomized" and exact_report[path].truncation in ("gram", "dense")
        scale = float(dense[path].norm())
        torch.testing.assert_close(product(randomized[path]), product(exact[path]), rtol=0, atol=1e-9 * scale)
        assert report[path].discarded == pytest.approx(exact_report[path].discarded, rel=1e-6, abs=1e-10 * scale)
        assert report[path].norm == pytest.approx(exact_report[path].norm, rel=1e-12)


@pytest.mark.parametrize("power_iterations", [0, 1])
def test_randomized_reports_its_own_discarded_norm_exactly(power_iterations):
    """A flat spectrum and a small Krylov space: the result is not the optimum, but the discarded norm reported is
    exactly ||dW - dW_r||_F of the factors returned, and no smaller than the optimum's."""
    adapters = adapters_like(8, shapes={"q": (48, 40), "down": (40, 72)})
    _, exact_report, _ = merge(adapters, 6, truncation="exact")
    merged, report, dense = merge(adapters, 6, truncation="randomized", oversample=0, power_iterations=power_iterations)
    for path in ("q", "down"):
        true = float((dense[path] - product(merged[path])).norm())
        assert report[path].discarded == pytest.approx(true, rel=1e-9)
        assert report[path].discarded >= exact_report[path].discarded * (1 - 1e-12)
        assert report[path].rank == 6 and merged[path].rank == 6


GRAM_SHAPES = {"q": (96, 80), "down": (80, 144)}  # R = 40 below a quarter of m + n: the range finder runs from the Grams


@pytest.mark.parametrize("decay", [0.3, None])
def test_randomized_from_grams_against_the_exact_truncation(decay):
    """sketch.randomized_from_grams (Krylov in the coefficients of B's range, from the R x R Grams): with a steeply
    decaying spectrum, the optimum (to 1e-6: a Krylov space of 36 columns in R = 40); with a flat one, no better than
    the optimum; either way its discarded norm exactly ||dW - dW_r||_F of the factors returned, from the Grams alone."""
    adapters = adapters_like(10, shapes=GRAM_SHAPES, decay=decay)
    options = dict(truncation="randomized", oversample=4, power_iterations=3) if decay else dict(truncation="randomized", oversample=3, power_iterations=0)
    sketch = {key: options[key] for key in ("oversample", "power_iterations")}  # 36 or 8 columns: fewer than R = 40
    exact, exact_report, dense = merge(adapters, 5, truncation="exact")
    randomized, report, _ = merge(adapters, 5, **options)
    for path, (m, n) in GRAM_SHAPES.items():
        assert truncation_module.krylov_from_grams(m, n, 40, 5, sketch) and report[path].truncation == "randomized"
        scale = float(dense[path].norm())
        true = float((dense[path] - product(randomized[path])).norm())
        assert report[path].discarded == pytest.approx(true, rel=1e-9, abs=1e-12 * scale)
        assert report[path].norm == pytest.approx(exact_report[path].norm, rel=1e-12)
        if decay:
            torch.testing.assert_close(product(randomized[path]), product(exact[path]), rtol=0, atol=1e-6 * scale)
            assert report[path].discarded == pytest.approx(exact_report[path].discarded, rel=1e-6)
        else:
            assert exact_report[path].discarded * (1 - 1e-12) <= report[path].discarded < 1.1 * exact_report[path].discarded


def test_randomized_from_grams_takes_qr_where_the_grams_fail():
    """Ten adapters that share one A (as LoRA-FA's frozen A): the merged update has rank 4, below the 8 columns of a
    Krylov block, which the Grams cannot orthonormalise; the module is truncated exactly by QR of its stacks instead
    (recorded "qr"), as the exact path does."""
    adapters = adapters_like(10, shapes={"q": GRAM_SHAPES["q"]})
    shared = adapters[0].modules["q"].A
    adapters = [dataclasses.replace(a, modules={"q": dataclasses.replace(a.modules["q"], A=shared)}) for a in adapters]
    exact, exact_report, dense = merge(adapters, 5, truncation="exact")
    merged, report, _ = merge(adapters, 5, truncation="randomized", oversample=3, power_iterations=2)
    assert report["q"].truncation == "qr" and exact_report["q"].truncation == "qr"
    torch.testing.assert_close(product(merged["q"]), product(exact["q"]), rtol=0, atol=1e-12 * float(dense["q"].norm()))


def test_krylov_from_grams_at_its_boundaries():
    """From the Grams where the Krylov space leaves room in R and R is at most GRAM_KRYLOV_SHARE of m + n."""
    sketch = {"oversample": 16, "power_iterations": 4}  # 400 columns at rank 64
    share = truncation_module.GRAM_KRYLOV_SHARE
    assert truncation_module.krylov_from_grams(4096, 4096, 1024, 64, sketch)
    assert not truncation_module.krylov_from_grams(4096, 4096, 400, 64, sketch)  # the Krylov space fills R
    assert truncation_module.krylov_from_grams(4096, 4096, 401, 64, sketch)
    assert truncation_module.krylov_from_grams(4096, 4096, int(share * 8192), 64, sketch)
    assert not truncation_module.krylov_from_grams(4096, 4096, int(share * 8192) + 1, 64, sketch)  # K = 256: on the factors
    assert not truncation_module.krylov_from_grams(500, 8192, 600, 64, sketch)  # R above m


@pytest.mark.parametrize("count, shape", [(8, (48, 40)), (10, (96, 80))])  # on the factors; from the Grams
def test_randomized_is_seeded_per_module(count, shape):
    """The same inputs give the same bytes; the seed changes the result; batching does not (from the Grams: but for
    the Grams' float64 summation, whose pieces a max_batch_bytes this small makes one column wide)."""
    adapters = adapters_like(count, shapes={"q": shape, "q2": shape})
    options = dict(truncation="randomized", oversample=0, power_iterations=0)
    first, _, _ = merge(adapters, 6, **options)
    again, _, _ = merge(adapters, 6, **options)
    one_at_a_time, _, _ = merge(adapters, 6, max_batch_bytes=1, **options)
    other_seed, _, _ = merge(adapters, 6, sketch_seed=1, **options)
    tolerance = 0 if count == 8 else 1e-12
    for path in first:
        assert torch.equal(again[path].A, first[path].A) and torch.equal(again[path].B, first[path].B)
        for got, want in ((one_at_a_time[path].A, first[path].A), (one_at_a_time[path].B, first[path].B)):
            torch.testing.assert_close(got, want, rtol=0, atol=tolerance * float(want.abs().max()))
        assert not torch.allclose(other_seed[path].A, first[path].A)
    # the test matrix of a module depends on (seed, path) alone, not on the other paths drawn with it
    assert torch.equal(seeded_gaussians(["x", "y"], 5, 3, 7)[1], seeded_gaussians(["y"], 5, 3, 7)[0])
    assert not torch.equal(seeded_gaussians(["x"], 5, 3, 7), seeded_gaussians(["y"], 5, 3, 7))


def test_automatic_choice_at_its_boundaries(monkeypatch):
    m = n = 4096
    l, q = 64 + DEFAULT_OVERSAMPLE, DEFAULT_POWER_ITERATIONS
    switch = next(R for R in range(MIN_RANDOMIZED_RANK, m) if truncation_path(m, n, R, 64) == "randomized")
    exact = 2.0 * (m + n) * switch**2 + CORE_FLOPS * switch**3
    assert exact > RANDOMIZED_SAVING * 4.0 * (q + 1) * (m + n) * switch * l  # the cost model's crossing
    assert truncation_path(m, n, switch - 1, 64) == "gram"
    assert all(truncation_path(m, n, R, 64) == "randomized" for R in (switch, 2 * switch, m - 1, m, 4 * m))
    assert truncation_path(m, n, m - 1, 64, "exact") == "gram" and truncation_path(m, n, m, 64, "exact") == "dense"
    # small R: exact whatever the model says; nothing to truncate: exact even when randomized is asked for
    assert truncation_path(m, n, MIN_RANDOMIZED_RANK - 1, 1, oversample=0, power_iterations=0) == "gram"
    assert truncation_path(m, n, MIN_RANDOMIZED_RANK, 1, oversample=0, power_iterations=0) == "randomized"
    assert truncation_path(m, n, 64, 64, "randomized") == "gram" and truncation_path(32, n, 64, 64, "randomized") == "dense"
    # a Krylov space as wide as the module ((q + 1) l = 400 columns): exact, even where the exact core costs most
    monkeypatch.setattr(truncation_module, "CORE_FLOPS", 1e9)
    assert truncation_path(400, 4096, 300, 64) == "gram" and truncation_path(400, 4096, 400, 64) == "dense"
    assert truncation_path(401, 4096, 300, 64) == "randomized" and truncation_path(400, 4096, 300, 64, "randomized") == "randomized"


def test_auto_picks_randomized_for_many_adapters_and_records_it(monkeypatch):
    """Through combine with auto: small modules stay exact (bit for bit as before), large R goes randomized."""
    monkeypatch.setattr(truncation_module, "MIN_RANDOMIZED_RANK", 16)
    monkeypatch.setattr(truncation_module, "CORE_FLOPS", 1e6)  # make the exact core look expensive at these sizes
    adapters = adapters_like(8, shapes={"big": (200, 180), "small": (12, 90)})
    merged, report, dense = merge(adapters, 3, oversample=2, power_iterations=1)
    assert report["big"].truncation == "randomized" and report["small"].truncation == "randomized"  # R = 32 > 12 too
    for path in ("big", "small"):
        assert report[path].discarded == pytest.approx(float((dense[path] - product(merged[path])).norm()), rel=1e-9)
    monkeypatch.setattr(truncation_module, "CORE_FLOPS", 20.0)
    monkeypatch.setattr(truncation_module, "MIN_RANDOMIZED_RANK", 256)
    auto, auto_report, _ = merge(adapters, 3)
    exact, _, _ = merge(adapters, 3, truncation="exact")
    assert auto_report["big"].truncation == "gram"
    assert torch.equal(auto["big"].A, exact["big"].A) and torch.equal(auto["big"].B, exact["big"].B)


def test_dense_path_is_the_optimal_truncation():
    """R >= min(m, n): the dense SVD, the Eckart-Young optimum."""
    adapters = adapters_like(7, shapes={"narrow": (20, 64)})  # R = 28 > 20
    merged, report, dense = merge(adapters, 5, truncation="exact")
    U, S, Vh = torch.linalg.svd(dense["narrow"])
    best = U[:, :5] @ torch.diag(S[:5]) @ Vh[:5]
    assert report["narrow"].truncation == "dense" and report["narrow"].input_rank == 28
    torch.testing.assert_close(product(merged["narrow"]), best, rtol=0, atol=1e-10 * float(S[0]))
    assert report["narrow"].discarded == pytest.approx(float(S[5:].square().sum().sqrt()), rel=1e-9)
    assert report["narrow"].norm == pytest.approx(float(S.square().sum().sqrt()), rel=1e-12)


def test_orthonormal_basis_of_rank_deficient_blocks():
    """Cholesky QR where it is accurate; Householder where Y has lower rank than its columns; earlier blocks
    projected out either way."""
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(2, 50, 6, generator=g, dtype=torch.float64)
    before = orthonormal_basis(torch.randn(2, 50, 4, generator=g, dtype=torch.float64))
    deficient = torch.cat([Y[..., :3], Y[..., :3] @ torch.randn(3, 3, generator=g, dtype=torch.float64)], -1)
    for block in (Y, deficient, before[..., :2] @ torch.randn(2, 6, generator=g, dtype=torch.float64)):
        Q = orthonormal_basis(block, before)
        torch.testing.assert_close(Q.mT @ Q, torch.eye(6, dtype=torch.float64).expand(2, 6, 6), rtol=0, atol=1e-12)
        assert (before.mT @ Q).abs().max() < 1e-12
    assert orthonormal_basis(torch.randn(5, 8, dtype=torch.float64)).shape == (5, 5)


def test_randomized_svd_of_a_zero_operator():
    B, A = torch.zeros(30, 6, dtype=torch.float64), torch.zeros(6, 20, dtype=torch.float64)
    L, S, Rt = randomized_svd(*factored(B, A), seeded_gaussians(["z"], 20, 4, 0)[0], 3, 1)
    assert S.abs().max() == 0 and torch.isfinite(L).all() and Rt.abs().max() == 0


def test_gram_of_many_adapters_equals_dense():
    """update_gram of many adapters (R = 576, larger than m and n): every pair's inner product, as dense."""
    adapters = adapters_like(72, r=8, shapes={"q": (32, 24), "w": (16, 40)})
    inner = update_gram(adapters).inner
    for m, path in enumerate(sorted(["q", "w"])):
        flat = torch.stack([a.modules[path].delta().reshape(-1) for a in adapters])
        torch.testing.assert_close(inner[m], flat @ flat.T, rtol=1e-12, atol=1e-12 * float(inner[m].diagonal().max()))


@pytest.mark.parametrize("option,value,message", [
    ("truncation", "fast", "unknown truncation 'fast'"),
    ("oversample", -1, "oversample must be a non-negative integer"),
    ("power_iterations", 1.5, "power_iterations must be a non-negative integer"),
    ("sketch_seed", True, "sketch_seed must be a non-negative integer"),
])
def test_option_errors(option, value, message):
    with pytest.raises(NanPeftError, match=message):
        merge(adapters_like(2), 3, **{option: value})


def test_randomized_merge_loads_in_peft(llama_adapters, tmp_path):
    """The randomized merge written as a peft adapter: each module's update as peft loads it is the exact merge's
    minus what was reported discarded, and with a Krylov space that holds the spectrum its logits are the exact
    svd merge's."""
    exact = merge_adapters(llama_adapters, combine="svd", rank=6, dtype=torch.float32)
    cat = {path: product(m) for path, m in merge_adapters(llama_adapters, combine="cat").adapter.modules.items()}
    ids = input_ids()
    logits = {}
    for name, options in (("exact", None), ("full", dict(oversample=8, power_iterations=4)), ("truncating", dict(oversample=0, power_iterations=0))):
        result = exact
        if options:
            modules, report = combine(exact.sources, exact.coefficients, exact.gram, "svd", 6, dtype=torch.float32,
                                      truncation="randomized", **options)
            result = dataclasses.replace(exact, adapter=dataclasses.replace(exact.adapter, modules=modules), report=report)
        result.save_pretrained(tmp_path / name)
        model = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / name)
        with torch.no_grad():
            logits[name] = model(ids).logits
        loaded = peft_deltas(model)
        for r in result.report:
            if r.truncation != "randomized":  # modules whose R <= 6 are exact: nothing to truncate
                assert not options or r.input_rank <= 6
                continue
            difference = float((loaded[r.module]["default"] - cat[r.module]).norm())
            assert difference == pytest.approx(r.discarded, rel=1e-4, abs=1e-6 * r.norm), r.module
        assert set(lora_layers(model)) == {r.module for r in result.report}
    torch.testing.assert_close(logits["full"], logits["exact"], rtol=1e-4, atol=1e-5)
    assert (logits["truncating"] - logits["exact"]).abs().max() > 0


ONE_PASS_SHAPES = {"q": (96, 80), "k": (96, 80), "down": (80, 144), "o": (50, 60), "narrow": (20, 64)}


@pytest.mark.parametrize("options", [
    dict(truncation="randomized", oversample=3, power_iterations=2),  # q, k, down from the Grams; o on the factors; narrow dense
    dict(truncation="auto", scale=0.5),  # exact (gram) and dense
    dict(truncation="randomized", oversample=3, power_iterations=2, coefficients="uniform", granularity="module"),
])
def test_one_pass_merge_is_update_gram_then_combine(monkeypatch, options):
    """merge_sources of an svd of task arithmetic takes the coefficients from update_norms and sums each group's Grams
    once (no update_gram, one factor_grams call a group): its gram, coefficients and merged factors are those of
    update_gram -> coefficients -> combine to rounding, its gram's diagonal update_norms' to the last bit."""
    import nan_peft.merge as merge_module
    from nan_peft.merge import merge_sources
    from nan_peft.norms import update_norms
    from nan_peft.spec import MergeSpec

    adapters = adapters_like(10, shapes=ONE_PASS_SHAPES)
    adapters[3] = dataclasses.replace(adapters[3], modules={p: m for p, m in adapters[3].modules.items() if p != "k"})  # k: a group of 9 adapters
    spec = MergeSpec(combine="svd", rank=5, **options)
    gram = update_gram(adapters)
    coefficients = coefficients_for(spec.coefficients, gram, **spec.provider_given)
    modules, report = combine(adapters, coefficients, gram, "svd", 5, dtype=torch.float64, options=spec.rule_given, **spec.truncation_given)
    calls = []
    norms_module = importlib.import_module("nan_peft.norms")
    grams = norms_module.factor_grams
    monkeypatch.setattr(norms_module, "factor_grams", lambda *a, **k: calls.append(a[0].paths) or grams(*a, **k))
    monkeypatch.setattr(merge_module, "update_gram", lambda *a, **k: pytest.fail("a second pass of Grams"))
    result = merge_sources(adapters, spec)
    assert sorted(calls) == [("down",), ("k",), ("narrow",), ("o",), ("q",)]
    assert torch.equal(result.gram.squared, update_norms(adapters).squared) and torch.equal(result.gram.present, gram.present)
    torch.testing.assert_close(result.gram.inner, gram.inner, rtol=1e-13, atol=0)
    torch.testing.assert_close(result.coefficients.values, coefficients.values, rtol=1e-14, atol=0)
    expected = {r.module: r for r in report}
    for r in result.report:
        assert r.truncation == expected[r.module].truncation
        assert r.norm == pytest.approx(expected[r.module].norm, rel=1e-12)
        assert r.discarded == pytest.approx(expected[r.module].discarded, rel=1e-9)
        scale = float(product(modules[r.module]).norm())
        torch.testing.assert_close(product(result.adapter.modules[r.module]), product(modules[r.module]), rtol=0, atol=1e-9 * scale)


def test_one_pass_merge_falls_back_where_a_weight_is_zero(monkeypatch):
    """A manual weight of 0 leaves an adapter out of the stacks, whose Grams then hold too few adapters for the inner
    products: the merge sums the inner products in a pass of their own (update_gram), with the same results."""
    import nan_peft.merge as merge_module

    adapters = adapters_like(4, shapes={"q": (96, 80)})
    calls = []
    real = merge_module.update_gram
    monkeypatch.setattr(merge_module, "update_gram", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = merge_adapters(adapters, combine="svd", rank=5, weights=[1.0, 0.0, 0.5, 2.0])
    assert calls == [1]
    torch.testing.assert_close(result.gram.inner, update_gram(adapters).inner, rtol=0, atol=0)
    dense = sum(w * a.modules["q"].delta() for w, a in zip([1.0, 0.0, 0.5, 2.0], adapters))
    assert result.report[0].discarded == pytest.approx(float((dense - product(result.adapter.modules["q"])).norm()), rel=1e-9)


def test_update_norms_are_update_grams_diagonal(llama_adapters):
    """Each adapter's own norms (different ranks, rank patterns, rsLoRA, embedding LoRA, different module sets) are
    the inner products' diagonal; a non-finite one is refused."""
    from nan_peft.norms import update_norms
    from nan_peft.reader import read_adapters

    adapters = read_adapters(llama_adapters)
    norms, gram = update_norms(adapters), update_gram(adapters)
    assert norms.modules == gram.modules and torch.equal(norms.present, gram.present)
    torch.testing.assert_close(norms.squared, gram.squared, rtol=1e-13, atol=0)
    torch.testing.assert_close(norms.adapter_norms, gram.adapter_norms, rtol=1e-13, atol=0)
    broken = adapters_like(2)
    broken[1].modules["q"].B[0, 0] = float("inf")
    with pytest.raises(NanPeftError, match="a1 at q has a non-finite norm"):
        update_norms(broken)


def test_one_pass_randomized_merge_loads_in_peft(llama_adapters, tmp_path):
    """merge_adapters' one pass, randomized (from the Grams where R <= (m + n) / 4, on the factors elsewhere), written
    and loaded by peft: each module's update as peft loads it is the exact merge's minus what was reported discarded."""
    cat = {path: product(m) for path, m in merge_adapters(llama_adapters, combine="cat").adapter.modules.items()}
    result = merge_adapters(llama_adapters, combine="svd", rank=2, dtype=torch.float32, truncation="randomized", oversample=0, power_iterations=1)
    sketch = {"oversample": 0, "power_iterations": 1}
    shapes = {path: (m.B.shape[0], m.A.shape[1]) for path, m in result.adapter.modules.items()}
    variants = {truncation_module.krylov_from_grams(*shapes[r.module], r.input_rank, 2, sketch) for r in result.report if r.truncation == "randomized"}
    assert variants == {True, False}
    result.save_pretrained(tmp_path / "merged")
    loaded = peft_deltas(PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "merged"))
    for r in result.report:
        difference = float((loaded[r.module]["default"] - cat[r.module]).norm())
        assert difference == pytest.approx(r.discarded, rel=1e-4, abs=1e-6 * r.norm), r.module


def test_norms_take_one_batched_gram_per_group_whatever_the_number_of_adapters(monkeypatch):
    """update_gram's work per group of same-shaped modules is one pass of batched Gram products (factor_grams) and one
    reduction of the R x R products to K x K, for 3 adapters as for 24: no loop over adapter pairs."""
    import nan_peft.norms as norms

    calls = []
    for name in ("factor_grams", "inner_products_from_grams"):
        real = getattr(norms, name)
        monkeypatch.setattr(norms, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    counts = []
    for count in (3, 24):
        calls.clear()
        update_gram(adapters_like(count))
        counts.append(len(calls))
    assert counts == [2 * len(SHAPES)] * 2


def test_randomized_path_stacks_each_factor_once(monkeypatch):
    """The randomized truncation on the factors stacks each group's factors once (batching.stack_terms) and reads those
    stacks again for the exact discarded norm: no per-adapter re-stacking (batching.stacked_chunks) after the range
    finder. (Here on every group: the range finder from the Grams is kept out.)"""
    monkeypatch.setattr(truncation_module, "GRAM_KRYLOV_SHARE", 0.0)
    calls = {"stack": 0, "chunks": 0}
    stack, chunks = truncation_module.stack_terms, truncation_module.stacked_chunks
    monkeypatch.setattr(truncation_module, "stack_terms", lambda *a, **k: calls.__setitem__("stack", calls["stack"] + 1) or stack(*a, **k))
    monkeypatch.setattr(truncation_module, "stacked_chunks", lambda *a, **k: calls.__setitem__("chunks", calls["chunks"] + 1) or chunks(*a, **k))
    _, report, _ = merge(adapters_like(6), 5, truncation="randomized", oversample=2, power_iterations=1)
    assert {r.truncation for r in report.values()} == {"randomized"}
    assert calls == {"stack": len(SHAPES), "chunks": 0}


# ---------------------------------------------------------------------------------------------------------
# the spectral rules' core space, structurally: same-shaped modules factored together, no Householder QR where the
# Grams serve (the references are tests/test_spectral_rules.py's)


def many_modules(paths, m=40, n=30, ranks=(3, 5, 2), seed=0, duplicate=None):
    """Three adapters over `paths` (same shape); at module `duplicate` the third adapter's factors repeat the first's
    (rank-deficient stacks)."""
    g = torch.Generator().manual_seed(seed)
    factors = [{p: (torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64))
                for p in paths} for r in ranks]
    if duplicate is not None:
        factors[2][duplicate] = tuple(t[: ranks[2]] if i == 0 else t[:, : ranks[2]] for i, t in enumerate(factors[0][duplicate]))
    return [LoraAdapter(f"a{k}", "", {}, {p: LoraModule(A, B, 1.5) for p, (A, B) in factors[k].items()}) for k in range(3)]


def test_core_space_factors_same_shaped_modules_together(monkeypatch):
    """Nine modules of one shape: two scaled Cholesky factorisations (one per side, batched over the modules) and no
    QR, whatever the number of modules; a module whose stacks are rank-deficient (the same factors twice) takes the
    QR path alone. Every module still equals the dense reference (iso_c: well defined on rank-deficient stacks, where
    TSV-M's polar factors are not unique)."""
    import nan_peft.core_space as core_space
    from test_spectral_rules import assert_close, module_references, update

    counts = {"cholesky": 0, "qr": 0}
    cholesky, qr = core_space.scaled_cholesky, torch.linalg.qr

    def counted_cholesky(gram, bound):
        counts["cholesky"] += 1
        return cholesky(gram, bound)

    def counted_qr(X, *args, **kwargs):
        counts["qr"] += 1
        return qr(X, *args, **kwargs)

    monkeypatch.setattr(core_space, "scaled_cholesky", counted_cholesky)
    monkeypatch.setattr(torch.linalg, "qr", counted_qr)
    paths = [f"layer{i}" for i in range(9)]
    for duplicate, qr_calls in ((None, 0), ("layer4", 2)):
        counts.update(cholesky=0, qr=0)
        result = merge_adapters(many_modules(paths, duplicate=duplicate), method="iso_c", dtype=torch.float64)
        assert counts == {"cholesky": 2, "qr": qr_calls}
        for path, (expected, _) in module_references(result, "iso_c", {}).items():
            assert_close(update(result, path), expected)
