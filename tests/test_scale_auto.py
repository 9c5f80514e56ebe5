"""--scale auto (nan_peft/scale.py): the merged update's global norm set to GAMMA times the |c|-weighted mean norm
of the adapters' updates, module by module. Checked against a dense float64 reference of the same formula (the
rules' own dense references from test_spectral_rules), on the CLI for every rule, and bad values refused."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from models import make_adapter
from nan_peft import LoraAdapter, LoraModule, NanPeftError, merge_adapters
from nan_peft.cli import cli
from nan_peft.rules import RULES
from nan_peft.scale import GAMMA
from nan_peft.spec import MergeSpec
from test_spectral_rules import module_references, update


def adapters_on_two_modules(seed=0):
    """Three adapters of ranks 3, 5, 2 on two modules of different shapes; the third lacks module "b"."""
    g = torch.Generator().manual_seed(seed)

    def module(r, m, n, s):
        return LoraModule(torch.randn(r, n, generator=g, dtype=torch.float64), torch.randn(m, r, generator=g, dtype=torch.float64), s)

    return [LoraAdapter(f"a{k}", "", {}, {"a": module(r, 40, 30, s), **({"b": module(r, 24, 36, 2 * s)} if k < 2 else {})})
            for k, (r, s) in enumerate(zip((3, 5, 2), (0.5, 2.0, 1.3)))]


def expected_scale(result, method, options):
    """GAMMA * sqrt(sum_m (sum_k |c_mk| ||D_mk|| / sum_k |c_mk|)^2) / sqrt(sum_m ||M_m||^2), all dense float64:
    D_mk = s_k B_k A_k, M_m the rule's dense reference merge of c_mk D_mk at scale 1, uncalibrated."""
    bare = {key: value for key, value in options.items() if key not in ("scale", "calibrate")}
    merged = module_references(result, method, bare)
    reference, norm = 0.0, 0.0
    for m, path in enumerate(result.coefficients.modules):
        c = result.coefficients.values[m].tolist()
        pairs = [(abs(c[k]), s.modules[path].delta().norm().item()) for k, s in enumerate(result.sources) if path in s.modules]
        reference += (sum(w * n for w, n in pairs) / sum(w for w, _ in pairs)) ** 2
        norm += merged[path][0].norm().item() ** 2
    return GAMMA * math.sqrt(reference) / math.sqrt(norm), merged


CASES = [
    ("task_arithmetic", {}),
    ("iso_c", {}),
    ("iso_cts", {"common": 0.6}),
    ("tsv", {}),
    ("tsv", {"calibrate": "svc"}),
    ("wudi", {}),
    ("knots_ties", {"density": 0.4}),
]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("coefficients", ["nan", [0.5, -0.8, 1.7]])
def test_auto_scale_matches_the_dense_reference(method, options, coefficients):
    result = merge_adapters(adapters_on_two_modules(), coefficients=coefficients, method=method, scale="auto",
                            dtype=torch.float64, **options)
    scale, merged = expected_scale(result, method, options)
    assert result.options["scale"] == "auto"
    assert result.options["scale_chosen"] == pytest.approx(scale, rel=1e-9)
    assert result.spec.scale == result.options["scale_chosen"]  # the spec the merge was made with (the fold reads it)
    again = merge_adapters(adapters_on_two_modules(), coefficients=coefficients, method=method, scale=scale,
                           dtype=torch.float64, **options)
    for path in merged:
        got, expected = update(result, path), update(again, path)
        assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    if "calibrate" not in options:  # linear in the scale: auto is the scale-1 merge times the number
        for path, (dense, _) in merged.items():
            got = update(result, path)
            assert (got - scale * dense).abs().max() <= 1e-9 * dense.abs().max() * scale
        total = math.sqrt(sum(update(result, p).norm().item() ** 2 for p in merged))
        assert total == pytest.approx(GAMMA * scale / scale * math.sqrt(sum(
            (sum(abs(c) * s.modules[p].delta().norm().item() for c, s in zip(result.coefficients.values[m].tolist(), result.sources)
                 if p in s.modules) / sum(abs(c) for c, s in zip(result.coefficients.values[m].tolist(), result.sources)
                                          if p in s.modules)) ** 2 for m, p in enumerate(result.coefficients.modules))), rel=1e-9)


def test_auto_scale_of_an_entry_wise_rule_uses_its_dense_merge():
    """TIES (dense, svd at full rank): the merged norm is the exact dense update's, as the report gives it."""
    adapters = adapters_on_two_modules(1)
    result = merge_adapters(adapters, method="ties", density=0.5, combine="svd", rank=24, scale="auto", dtype=torch.float64)
    bare = merge_adapters(adapters, method="ties", density=0.5, combine="svd", rank=24, dtype=torch.float64)
    ratio = result.options["scale_chosen"]
    for path in bare.adapter.modules:
        torch.testing.assert_close(update(result, path), ratio * update(bare, path), rtol=1e-9, atol=1e-12)
    norm = math.sqrt(sum(r.norm ** 2 for r in bare.report))
    n = bare.gram.module_norms
    c = bare.coefficients.values.abs()
    reference = math.sqrt(sum(((c[m] * n[m]).sum() / c[m].sum()).item() ** 2 for m in range(len(n))))
    assert ratio == pytest.approx(GAMMA * reference / norm, rel=1e-12)


@pytest.mark.parametrize("options,message", [
    ({"method": "ties", "density": 0.5}, "svd needs a target rank"),
    ({"method": "tsv", "combine": "cat", "rank": 2}, "cat is exact and needs rank >= 10"),
    ({"method": "dare_linear", "density": 0.5, "combine": "cat"}, "combine them with svd and a rank, not cat"),
])
def test_auto_refuses_a_bad_combine_before_measuring(monkeypatch, options, message):
    """The merge's own arguments are checked before the rule is measured (which can be a whole dense pass)."""
    import nan_peft.merge as merge

    def measured(*args, **kwargs):
        raise AssertionError("measured before the arguments were checked")

    monkeypatch.setattr(merge, "merged_norms", measured)
    with pytest.raises(NanPeftError, match=message):
        merge_adapters(adapters_on_two_modules(), scale="auto", **options)


@pytest.mark.parametrize("duplicate", [False, True])  # a duplicate makes the stacks rank-deficient: core_space's QR path
@pytest.mark.parametrize("method,options", CASES + [("ties", {"density": 0.5, "combine": "svd", "rank": 10})])
def test_merged_norms_are_the_merges_own(method, options, duplicate):
    """combination.merged_norms, what auto measures without forming factors, equals the norms the merge at scale 1
    reports (the singular values of its core, the dense update's, the Grams')."""
    from nan_peft.combination import merged_norms

    adapters = adapters_on_two_modules(3)
    adapters += adapters[:1] if duplicate else []
    bare = {key: value for key, value in options.items() if key != "calibrate"}
    result = merge_adapters(adapters, method=method, dtype=torch.float64, allow_duplicates=duplicate, **bare)
    rule = {key: value for key, value in bare.items() if key not in ("combine", "rank")}
    norms = merged_norms(result.sources, result.coefficients, result.gram, method, rule)
    assert norms == pytest.approx([r.norm for r in result.report], rel=1e-12)


@pytest.mark.parametrize("method,options", [("tsv", {}), ("knots_ties", {"density": 0.5}), ("task_arithmetic", {"combine": "svd", "rank": 6}),
                                            ("ties", {"density": 0.5, "combine": "svd", "rank": 6})])
def test_auto_measures_the_rule_without_forming_its_factors(monkeypatch, method, options):
    """The measuring pass forms no merged factors: as many SVDs of merged cores, of dense updates and Gram
    truncations as the merge at a given scale, and the merge at that scale is the one returned."""
    import nan_peft.combination as combination
    import nan_peft.core_space as core_space

    calls = {"core": 0, "dense": 0, "gram": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(core_space, "wide_svd_parts", counted("core", core_space.wide_svd_parts))
    monkeypatch.setattr(combination, "truncate_dense", counted("dense", combination.truncate_dense))
    monkeypatch.setattr(combination, "truncate_groups", counted("gram", combination.truncate_groups))
    adapters = adapters_on_two_modules(2)
    auto = merge_adapters(adapters, method=method, scale="auto", dtype=torch.float64, **options)
    counts = dict(calls)
    calls.update(dict.fromkeys(calls, 0))
    fixed = merge_adapters(adapters, method=method, scale=auto.options["scale_chosen"], dtype=torch.float64, **options)
    assert sum(counts.values()) > 0 and counts == calls
    for path in fixed.adapter.modules:  # the same bytes, but for task arithmetic's svd: at a given scale it takes the one-pass path
        expected = update(fixed, path)
        tolerance = 1e-12 * float(expected.abs().max()) if method == "task_arithmetic" else 0.0
        torch.testing.assert_close(update(auto, path), expected, rtol=0, atol=tolerance)


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale-auto-cli")
    make_adapter(root / "big", seed=31, magnitude=0.1, r=8, lora_alpha=16)
    make_adapter(root / "small", seed=32, magnitude=0.2, r=4, lora_alpha=4)
    return root


RULE_FLAGS = {"ties": ["--density", "0.5", "--combine", "svd", "--rank", "8"], "dare_linear": ["--density", "0.5", "--combine", "svd", "--rank", "8"],
              "dare_ties": ["--density", "0.5", "--combine", "svd", "--rank", "8"],
              "magnitude_prune": ["--density", "0.5", "--combine", "svd", "--rank", "8"],
              "knots_ties": ["--density", "0.5"], "knots_dare": ["--density", "0.5"], "iso_cts": ["--common", "0.5"]}


@pytest.mark.parametrize("method", list(RULES))
def test_cli_scale_auto_works_for_every_rule(cli_dir, monkeypatch, tmp_path, method):
    monkeypatch.chdir(tmp_path)
    paths = [str(cli_dir / "big"), str(cli_dir / "small")]
    result = CliRunner().invoke(cli, ["merge", *paths, "-o", "out", "--method", method, *RULE_FLAGS.get(method, []),
                                      "--scale", "auto", "--json", "-q"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    record = json.loads((tmp_path / "out" / "merge_record.json").read_text())
    chosen = record["options"]["scale_chosen"]
    assert record["options"]["scale"] == "auto" and chosen > 0
    assert document["scale_chosen"] == chosen and document["rule"]["scale"] == chosen
    # the same merge with the number given writes the same tensors
    again = CliRunner().invoke(cli, ["merge", *paths, "-o", "fixed", "--method", method, *RULE_FLAGS.get(method, []),
                                     "--scale", repr(chosen), "-q"])
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == (tmp_path / "fixed" / "adapter_model.safetensors").read_bytes()


def test_numbers_and_auto_from_a_recipe(cli_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    paths = [str(cli_dir / "big"), str(cli_dir / "small")]
    for name, value in (("half", 0.5), ("auto", "auto"), ("two", 2)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"adapters": paths, "output": name, "method": "tsv", "scale": value}))
        assert CliRunner().invoke(cli, ["merge", "--config", f"{name}.yaml", "-q"]).exit_code == 0
    merge_adapters(paths, method="tsv", scale=0.5).save_pretrained("py")
    assert (tmp_path / "py" / "adapter_model.safetensors").read_bytes() == (tmp_path / "half" / "adapter_model.safetensors").read_bytes()
    assert "scale_chosen" not in json.loads((tmp_path / "half" / "merge_record.json").read_text())["options"]


@pytest.mark.parametrize("args,message", [
    (["--scale", "fast"], "scale must be a number or auto, got 'fast'"),
    (["--scale", "nan"], "scale must be a finite number"),
    (["--scale", "0"], "scale 0 makes the merged update zero"),
])
def test_cli_bad_scale_is_one_line_and_writes_nothing(cli_dir, monkeypatch, args, message):
    monkeypatch.chdir(cli_dir)
    result = CliRunner().invoke(cli, ["merge", "big", "small", "-o", "x", "--method", "tsv", *args])
    assert result.exit_code != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (Path(cli_dir) / "x").exists()


@pytest.mark.parametrize("value,message", [("fast", "must be a number or auto"), (True, "must be a number or auto")])
def test_bad_scale_in_a_recipe_or_python(cli_dir, monkeypatch, tmp_path, value, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"adapters": [str(cli_dir / "big")], "output": "o", "scale": value}))
    result = CliRunner().invoke(cli, ["merge", "--config", "r.yaml"])
    assert result.exit_code != 0 and len(result.stderr.splitlines()) == 1 and message in result.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(NanPeftError, match="scale must be a number or auto"):
        MergeSpec(scale=value)


def test_full_checkpoint_merge_refuses_auto(tmp_path):
    """A full-checkpoint merge builds no LoRA factors to measure: auto is refused before anything is read."""
    from nan_peft.full.merge import merge_checkpoints

    with pytest.raises(NanPeftError, match="--scale auto is for LoRA merges"):
        merge_checkpoints(tmp_path / "base", [tmp_path / "ft"], tmp_path / "out", MergeSpec(scale="auto"))
    assert not (tmp_path / "out").exists()


def test_card_names_the_chosen_scale(cli_dir, tmp_path):
    result = merge_adapters([str(cli_dir / "big"), str(cli_dir / "small")], method="tsv", scale="auto")
    result.save_pretrained(tmp_path / "o")
    from nan_peft.record import merge_record, model_card

    card = model_card(result, merge_record(result, [], ["nan-peft"]), str(tmp_path / "o"))
    assert f"scale auto = {result.options['scale_chosen']:.6g}" in card
