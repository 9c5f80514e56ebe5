"""The spectral rules (issue 18) against dense float64 references written here from the papers' definitions, on
each module's full m x n updates, never through nan-peft's core space: Iso-C and Iso-CTS (Marczak et al. 2025),
TSV-M (Gargiulo et al. 2025), WUDI (Cheng et al. 2025, closed form), KnOTS-TIES / KnOTS-DARE (Stoica et al. 2025)
and singular value calibration (Li et al. 2026); the written adapters loaded by peft; options; bad input."""

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import PeftModel

from models import BASES, LLAMA, input_ids, make_adapter
from nan_peft import LoraAdapter, LoraModule, NanPeftError, gram, merge_adapters
from nan_peft.cli import cli
from nan_peft.combination import dense_updates
from nan_peft.rules import module_generator
from oracle import load_sources, peft_deltas
from test_rules import disjoint, trimmed

TOL = 1e-9  # float64 throughout: agreement to rounding, relative to the largest entry


# ---------------------------------------------------------------------------------------------------------
# dense references, from the papers


def nonzero_svd(T, tol=1e-9):
    U, S, Vh = torch.linalg.svd(T, full_matrices=False)
    k = int((S > tol * S[0]).sum()) if S[0] > 0 else 0
    return U[:, :k], S[:k], Vh[:k]


def orthogonal(X):
    """Polar factor by SVD, as TSV-M and Iso-CTS orthogonalise (u @ vh)."""
    u, _, vh = torch.linalg.svd(X, full_matrices=False)
    return u @ vh


def iso_c_ref(taus):
    U, S, Vh = nonzero_svd(sum(taus))
    return S.mean() * U @ Vh


def iso_cts_ref(taus, common=0.8):
    K = len(taus)
    d = min(len(nonzero_svd(torch.cat(taus, 1))[1]), len(nonzero_svd(torch.cat(taus, 0))[1]))
    k = int(d * common)
    specific = round((d - k) / K) * K
    if specific > d:
        specific -= K
    k, t = d - specific, specific // K
    U, S, Vh = torch.linalg.svd(sum(taus), full_matrices=False)
    Uc = U[:, :k]
    us, vs, ss = [], [], []
    for tau in taus:
        u, s, vh = torch.linalg.svd(tau - Uc @ Uc.T @ tau, full_matrices=False)
        us.append(u[:, :t]), vs.append(vh[:t]), ss.append(s[:t])
    us.append(Uc), vs.append(Vh[:k]), ss.append(S[:k])
    return torch.cat(ss).mean() * orthogonal(torch.cat(us, 1)) @ orthogonal(torch.cat(vs, 0))


def tsv_ref(taus):
    parts = [nonzero_svd(tau) for tau in taus]
    U = orthogonal(torch.cat([u for u, _, _ in parts], 1))
    Vh = orthogonal(torch.cat([vh for _, _, vh in parts], 0))
    return U @ torch.diag(torch.cat([s for _, s, _ in parts])) @ Vh


def wudi_objective(T, taus):
    return sum(((T - tau) @ tau.T).square().sum() / tau.square().sum() for tau in taus)


def wudi_ref(taus):
    """argmin_T sum_k ||(T - T_k) T_k^T||^2 / ||T_k||^2, the minimum-norm one: normal equations T H = C."""
    w = [1 / tau.square().sum() for tau in taus]
    H = sum(wk * tau.T @ tau for wk, tau in zip(w, taus))
    C = sum(wk * tau @ tau.T @ tau for wk, tau in zip(w, taus))
    return C @ torch.linalg.pinv(H, hermitian=True, rtol=1e-12)


def knots_ref(taus, density, sparsify="trim", seed=0, path=""):
    n = taus[0].shape[1]
    U, S, Vh = nonzero_svd(torch.cat(taus, 1))
    blocks = [torch.diag(S) @ Vh[:, k * n : (k + 1) * n] for k in range(len(taus))]
    if sparsify == "trim":
        blocks = [trimmed(b, density) for b in blocks]
    else:
        keep = torch.rand((len(blocks), *blocks[0].shape), generator=module_generator(seed, path), dtype=torch.float64) < density
        blocks = [b * kb / density for b, kb in zip(blocks, keep)]
    return U @ disjoint(blocks, [1.0] * len(blocks))


def svc_ref(merged, own):
    """SVC as lyymuwu/SVC merge_func.py (coef_cal_multi_ranks): sigma_r / max(mean_k s_rk, 1) where all s_rk > 0."""
    U, S, Vh = nonzero_svd(merged)
    calibrated = S.clone()
    for r in range(len(S)):
        s = []
        for D in own:
            a = U[:, r] @ D
            s.append(float((S[r] * Vh[r]) @ a / (a @ a)) if a.norm() > 1e-9 * D.norm() else 0.0)
        if all(v > 0 for v in s):
            calibrated[r] = S[r] / max(sum(s) / len(s), 1.0)
    return U @ torch.diag(calibrated) @ Vh


REFERENCES = {
    "iso_c": lambda taus, own, o: iso_c_ref(taus),
    "iso_cts": lambda taus, own, o: iso_cts_ref(taus, o.get("common", 0.8)),
    "tsv": lambda taus, own, o: tsv_ref(taus),
    "wudi": lambda taus, own, o: wudi_ref(taus),
    "knots_ties": lambda taus, own, o: knots_ref(taus, o["density"]),
    "knots_dare": lambda taus, own, o: knots_ref(taus, o["density"], "drop", o.get("seed", 0), o["path"]),
    "task_arithmetic": lambda taus, own, o: sum(taus),
}


def reference(method, taus, own, options):
    merged = options.get("scale", 1.0) * REFERENCES[method](taus, own, options)
    return svc_ref(merged, own) if options.get("calibrate") == "svc" else merged


def module_references(result, method, options):
    """{module: (dense reference of the merge, own updates)} from the sources' float64 updates s_k B_k A_k."""
    out = {}
    for m, path in enumerate(result.coefficients.modules):
        c = result.coefficients.values[m].tolist()
        own = [(k, s.modules[path].delta()) for k, s in enumerate(result.sources) if path in s.modules and c[k] != 0]
        taus = [c[k] * d for k, d in own]
        out[path] = (reference(method, taus, [d for _, d in own], {**options, "path": path}), [d for _, d in own])
    return out


def update(result, path):
    mod = result.adapter.modules[path]
    return mod.scale * (mod.B.double() @ mod.A.double())


def assert_close(got, expected, tol=TOL):
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tol * scale, (got - expected).abs().max().item() / scale


CASES = [
    ("iso_c", {}),
    ("iso_cts", {}),
    ("iso_cts", {"common": 0.6}),
    ("tsv", {}),
    ("tsv", {"calibrate": "svc", "scale": 0.7}),
    ("wudi", {}),
    ("knots_ties", {"density": 0.4}),
    ("knots_ties", {"density": 1.0, "calibrate": "svc"}),
    ("knots_dare", {"density": 0.5, "seed": 3}),
    ("task_arithmetic", {"calibrate": "svc"}),
]


@pytest.mark.parametrize("method,options", CASES)
def test_rule_matches_dense_reference_on_peft_adapters(llama_adapters, method, options):
    """Four real peft adapters: ranks 4, 8 (rank_pattern 2 on v_proj, an alpha_pattern), 6 with rsLoRA (an
    embedding among its modules), 2 on one layer; NAN coefficients; float64 output, so rounding alone differs."""
    result = merge_adapters(llama_adapters, method=method, dtype=torch.float64, **options)
    assert result.options["combine"] == "cat"
    for path, (expected, _) in module_references(result, method, options).items():
        assert_close(update(result, path), expected)
        report = next(r for r in result.report if r.module == path)
        assert report.discarded == 0 and report.norm == pytest.approx(expected.norm().item(), rel=1e-9)


def test_read_updates_are_peft_updates(llama_adapters):
    """The references' s_k B_k A_k are peft's own (rsLoRA, rank and alpha patterns): checked once here."""
    result = merge_adapters(llama_adapters, method="iso_c", dtype=torch.float64)
    peft = peft_deltas(load_sources(LLAMA, llama_adapters))
    for path in result.coefficients.modules:
        for k, source in enumerate(result.sources):
            if path in source.modules:
                torch.testing.assert_close(source.modules[path].delta(), peft[path][f"s{k}"], rtol=1e-5, atol=1e-7)


def small_adapters(ranks=(3, 5, 2), scales=(0.5, 2.0, 1.3), m=40, n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        LoraAdapter(f"a{k}", "", {}, {"m": LoraModule(torch.randn(r, n, generator=g, dtype=torch.float64),
                                                      torch.randn(m, r, generator=g, dtype=torch.float64), s)})
        for k, (r, s) in enumerate(zip(ranks, scales))
    ]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -0.8, 1.7]])
def test_rule_matches_dense_reference_with_manual_weights(method, options, weights):
    adapters = small_adapters()
    result = merge_adapters(adapters, coefficients=weights, method=method, dtype=torch.float64, **options)
    (expected, _), = module_references(result, method, options).values()
    assert_close(update(result, "m"), expected)


@pytest.mark.parametrize("method,options", [("knots_ties", {"density": 0.4}), ("knots_dare", {"density": 0.5, "seed": 2})])
def test_knots_from_the_concatenations_gram_matches_the_reference(monkeypatch, method, options):
    """A module wide enough (R x K n left-reduced updates, 10 x 7200) for KnOTS's SVD of the concatenation to come from
    its Gram (gram.left_svd_of_gram, no right singular vectors formed), the updates given as their factors
    (knots.Factored, core_space's batched path) or densely: the same merge as the dense reference."""
    import nan_peft.rules.knots as knots

    taken = []
    monkeypatch.setattr(knots, "left_svd_of_gram", lambda *a: taken.append(gram.left_svd_of_gram(*a)) or taken[-1])
    adapters = small_adapters(n=2400, seed=3)
    result = merge_adapters(adapters, coefficients=[0.5, -0.8, 1.7], method=method, dtype=torch.float64, **options)
    assert taken and all(t is not None for t in taken)
    (expected, _), = module_references(result, method, options).values()
    assert_close(update(result, "m"), expected)

    g = torch.Generator().manual_seed(0)
    # left well-conditioned but not orthogonal: tasks whose left spaces are orthogonal leave blocks with rows of
    # rounding noise, whose signs TIES counts (in either path, differently)
    left = torch.eye(10, dtype=torch.float64) + 0.5 * torch.randn(10, 10, generator=g, dtype=torch.float64)
    right = torch.randn(10, 2400, generator=g, dtype=torch.float64)
    stack = knots.Factored(left, right, [slice(0, 4), slice(4, 7), slice(7, 10)], right @ right.mT)
    weights = torch.tensor([0.5, -0.8, 1.7], dtype=torch.float64)
    rule, params = getattr(knots, method), {k: v for k, v in options.items() if k != "seed"}
    factored, dense = (rule(x, weights, torch.Generator().manual_seed(2), **params) for x in (stack, stack.dense()))
    assert gram.wide_left_svd(stack.dense(), weights) is not None  # the dense input takes the Gram path too
    assert_close(factored, dense, 1e-10)


def test_rank_above_a_side_and_ranks_beyond_it():
    """R = 26 > n = 20: the stacked A's rows span all of R^n (q = n < R); the core is 26 x 20."""
    adapters = small_adapters(ranks=(12, 9, 5), m=40, n=20, seed=1)
    for method, options in CASES:
        result = merge_adapters(adapters, method=method, dtype=torch.float64, **options)
        (expected, _), = module_references(result, method, options).values()
        assert_close(update(result, "m"), expected, 1e-8)


def test_scale_multiplies_the_rule_of_the_own_updates():
    """--method tsv --weights 1,1,1 --scale 0.3 is 0.3 times TSV-M of s_k B_k A_k."""
    adapters = small_adapters()
    result = merge_adapters(adapters, method="tsv", weights=[1, 1, 1], scale=0.3, dtype=torch.float64)
    own = [a.modules["m"].delta() for a in adapters]
    assert_close(update(result, "m"), 0.3 * tsv_ref(own))


@pytest.mark.parametrize("method,options", [("tsv", {}), ("wudi", {"calibrate": "svc"}), ("knots_ties", {"density": 0.5})])
def test_svd_truncation_is_optimal_and_reported(llama_adapters, method, options):
    result = merge_adapters(llama_adapters, method=method, combine="svd", rank=3, dtype=torch.float64, **options)
    assert result.rank == 3
    for path, (expected, _) in module_references(result, method, options).items():
        U, S, Vh = torch.linalg.svd(expected, full_matrices=False)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        assert_close(update(result, path), best)
        report = next(r for r in result.report if r.module == path)
        assert report.discarded == pytest.approx((expected - best).norm().item(), rel=1e-7, abs=1e-12)


def test_wudi_closed_form_against_the_papers_optimiser():
    """The closed form is the objective's minimum (zero gradient); the paper's solver (Adam, lr 1e-5, 300 steps from
    sum_k T_k, fusion_bench/method/wudi/wudi.py) stops above it and leaves the updates' span (it is full rank)."""
    adapters = small_adapters(ranks=(3, 4, 2), m=24, n=20, seed=2)
    taus = [a.modules["m"].delta() / 30 for a in adapters]  # entries ~0.1, Adam's steps of 1e-5 still move it
    closed = RULES_wudi(taus)
    w = [1 / t.square().sum() for t in taus]
    gradient = sum(wk * (closed - t) @ t.T @ t for wk, t in zip(w, taus))
    assert gradient.abs().max() < 1e-10 * sum(wk * t @ t.T @ t for wk, t in zip(w, taus)).abs().max()
    T = torch.nn.Parameter(sum(taus).clone())
    optimiser = torch.optim.Adam([T], lr=1e-5)
    for _ in range(300):
        optimiser.zero_grad()
        loss = wudi_objective(T, taus)
        loss.backward()
        optimiser.step()
    adam = T.detach()
    assert wudi_objective(closed, taus) < wudi_objective(adam, taus) < wudi_objective(sum(taus), taus)
    assert torch.linalg.matrix_rank(adam).item() > 9 == torch.linalg.matrix_rank(closed).item()


def RULES_wudi(taus):
    from nan_peft.rules import RULES

    return RULES["wudi"](torch.stack(taus), torch.ones(len(taus), dtype=torch.float64))


def test_rules_give_the_same_on_dense_updates_and_on_cores(llama_adapters):
    """The registered functions themselves applied to the dense updates (the way FusionBench runs them) equal the
    core-space merge; dense_updates (the fold's source) gives the core merge's product."""
    from nan_peft.rules import RULES

    for method, options in CASES:
        result = merge_adapters(llama_adapters, method=method, dtype=torch.float64, **options)
        dense = {p: u for p, _, u in dense_updates(result.sources, result.coefficients, method, options)}
        for m, path in enumerate(result.coefficients.modules):
            c = result.coefficients.values[m]
            members = [k for k, s in enumerate(result.sources) if path in s.modules and c[k] != 0]
            deltas = torch.stack([result.sources[k].modules[path].delta() for k in members])
            params = dict(options)
            seed = params.pop("seed", None)
            generator = module_generator(seed, path) if seed is not None else None
            direct = RULES[method](deltas, c[members], generator, **params)
            assert_close(update(result, path), direct)
            assert_close(dense[path], direct)


@pytest.mark.parametrize("method,options", [("tsv", {"calibrate": "svc"}), ("knots_dare", {"density": 0.6, "seed": 1}), ("iso_cts", {})])
def test_written_adapter_loads_in_peft_with_the_reference_logits(llama_adapters, tmp_path, method, options):
    result = merge_adapters(llama_adapters, method=method, **options)
    path = result.save_pretrained(tmp_path / "merged")
    model = PeftModel.from_pretrained(BASES[LLAMA](), path).eval()
    reference_model = BASES[LLAMA]()
    with torch.no_grad():
        for module, (expected, _) in module_references(result, method, options).items():
            template = result.sources[0].modules.get(module) or next(s.modules[module] for s in result.sources if module in s.modules)
            weight = reference_model.get_submodule(module).weight
            weight += template.weight_delta(expected).to(weight.dtype)
        got, want = model(input_ids()).logits, reference_model(input_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(want, BASES[LLAMA]()(input_ids()).logits, atol=1e-3)  # the merge changes the logits


def test_options_change_the_result():
    adapters = small_adapters(ranks=(6, 6, 6))
    iso = {c: update(merge_adapters(adapters, method="iso_cts", common=c, dtype=torch.float64), "m") for c in (0.5, 0.8)}
    assert not torch.allclose(iso[0.5], iso[0.8])
    plain = update(merge_adapters(adapters, method="tsv", weights=[1, 1, 1], dtype=torch.float64), "m")
    calibrated = update(merge_adapters(adapters, method="tsv", weights=[1, 1, 1], calibrate="svc", dtype=torch.float64), "m")
    assert calibrated.norm() <= plain.norm() + 1e-12
    one = merge_adapters(adapters, method="knots_dare", density=0.5, seed=1, dtype=torch.float64)
    assert torch.equal(update(one, "m"), update(merge_adapters(adapters, method="knots_dare", density=0.5, seed=1, dtype=torch.float64), "m"))
    assert not torch.allclose(update(one, "m"), update(merge_adapters(adapters, method="knots_dare", density=0.5, seed=2, dtype=torch.float64), "m"))
    assert one.options["seed"] == 1 and one.options["method"] == "knots_dare"


@pytest.mark.parametrize("options,message", [
    (dict(method="iso_cts", common=1.0), r"common must be in \(0, 1\)"),
    (dict(method="iso_cts", common=0), r"common must be in \(0, 1\)"),
    (dict(method="iso_c", common=0.5), "iso_c rule: no option common"),
    (dict(method="iso_c", calibrate="svc"), "does not follow iso_c .its merged spectrum is flat"),
    (dict(method="ties", density=0.5, rank=4, calibrate="svc"), "does not follow ties .it acts entry-wise"),
    (dict(method="tsv", calibrate="tune"), "unknown calibrate 'tune'"),
    (dict(method="knots_ties"), "knots_ties rule: needs density"),
    (dict(method="tsv", seed=2), "tsv rule: no option seed"),
    (dict(method="tsv", combine="cat", rank=4), "cat is exact and needs rank >= 10"),
    (dict(method="iso_c", combine="svd", rank=4), "iso_c gives a flat spectrum"),
    (dict(method="iso_cts", common=0.5, coefficients=[1, 1, 1]), "task 3 has 1 outside the common subspace; raise common"),
])
def test_bad_options_are_refused(options, message):
    adapters = small_adapters(ranks=(3, 6, 1))
    with pytest.raises(NanPeftError, match=message):
        merge_adapters(adapters, **options)


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral-cli")
    make_adapter(root / "big", seed=21, magnitude=0.1, r=8, lora_alpha=16)
    make_adapter(root / "one", seed=22, magnitude=0.2, r=1, lora_alpha=2)
    return root


@pytest.mark.parametrize("args,message", [
    (["--method", "slerp"], "'--method': 'slerp' is not one of"),
    (["--method", "iso_cts", "--common", "1.5"], "common must be in (0, 1), got 1.5"),
    (["--method", "iso_cts", "--common", "0"], "common must be in (0, 1), got 0"),
    (["--method", "iso_cts", "--common", "0.5"], "task 2 has 1 outside the common subspace; raise common"),
    (["--method", "tsv", "--rank", "4"], "cat is exact and needs rank >= 9"),
    (["--method", "iso_c", "--calibrate", "svc"], "does not follow iso_c"),
    (["--method", "iso_cts", "--combine", "svd", "--rank", "4"], "iso_cts gives a flat spectrum"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(cli_dir, monkeypatch, args, message):
    monkeypatch.chdir(cli_dir)
    result = CliRunner().invoke(cli, ["merge", "big", "one", "-o", "x", *args])
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (cli_dir / "x").exists() and not [p for p in Path(cli_dir).iterdir() if p.name.startswith(".x.")]


@pytest.mark.parametrize("method,options", [("iso_cts", {"common": 0.9}), ("tsv", {"calibrate": "svc", "scale": 0.5}),
                                            ("knots_dare", {"density": 0.5, "seed": 4}), ("wudi", {})])
def test_cli_recipe_and_python_give_the_same_bytes(cli_dir, tmp_path, monkeypatch, method, options):
    monkeypatch.chdir(tmp_path)
    paths = [str(cli_dir / "big"), str(cli_dir / "one")]
    merge_adapters(paths, method=method, **options).save_pretrained("py")
    flags = [f"--{k}={v}" for k, v in options.items()]
    assert CliRunner().invoke(cli, ["merge", *paths, "-o", "cli", "--method", method, *flags, "-q"]).exit_code == 0
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"adapters": paths, "output": "recipe", "method": method, **options}))
    assert CliRunner().invoke(cli, ["merge", "--config", "recipe.yaml", "-q"]).exit_code == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        expected = (tmp_path / "py" / name).read_bytes()
        assert (tmp_path / "cli" / name).read_bytes() == expected and (tmp_path / "recipe" / name).read_bytes() == expected
