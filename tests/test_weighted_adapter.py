"""nan_peft.add_weighted_adapter against peft's own model.add_weighted_adapter on a copy of the same model: equal
where peft computes the weighted update right, and where it does not, equal to a dense float64 reference
while peft's result differs from it in the way the docstring states."""

import copy
import inspect
import math
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraModel
from peft.utils import merge_utils

import nan_peft
from models import input_ids, tiny_gpt2, tiny_llama
from nan_peft import NanPeftError
from nan_peft.rules import RULES, module_generator
from oracle import lora_layers

pytestmark = pytest.mark.filterwarnings("ignore:The density")  # peft's prune warns at density 1

NAMES = ["a", "b", "c"]
SAME_RANKS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=4, lora_alpha=4), "c": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj"])}


def build(specs, seed=0, base=tiny_llama):
    """A tiny Llama (or `base`) with one peft adapter per spec, random non-zero factors (lora_B too)."""
    model = None
    for name, spec in specs.items():
        spec = {"target_modules": ["q_proj", "v_proj"], **spec}
        if model is None:
            model = get_peft_model(base(), LoraConfig(**spec), adapter_name=name)
        else:
            model.add_adapter(name, LoraConfig(**spec))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def same_ranks():
    return build(SAME_RANKS)


@pytest.fixture(scope="module")
def same_modules():
    return build({name: dict(r=4, lora_alpha=8) for name in NAMES}, seed=1)


def deltas(model, name):
    """{module path: the adapter's update as peft computes it (get_delta_weight), float64}."""
    with torch.no_grad():
        return {
            path: layer.get_delta_weight(name).double()
            for path, layer in lora_layers(model).items()
            if name in layer.lora_A or name in layer.lora_embedding_A
        }


def logits(model, name):
    model.set_adapter(name)
    with torch.no_grad():
        return model(input_ids()).logits


def both(model, weights, combination_type, **kwargs):
    """(nan-peft's model, peft's model): each a copy of `model` with adapter "m" added by its add_weighted_adapter."""
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    nan_peft.add_weighted_adapter(ours, NAMES[: len(weights)], weights, "m", combination_type=combination_type, **kwargs)
    theirs.add_weighted_adapter(NAMES[: len(weights)], weights, "m", combination_type=combination_type, **kwargs)
    return ours, theirs


def assert_same_adapter(ours, theirs, atol=1e-6):
    mine, peft = deltas(ours, "m"), deltas(theirs, "m")
    zero = {p for p, d in peft.items() if not d.any()}
    assert set(mine) == set(peft) - zero
    for path in mine:
        torch.testing.assert_close(mine[path], peft[path], rtol=1e-5, atol=atol)
    torch.testing.assert_close(logits(ours, "m"), logits(theirs, "m"), rtol=1e-5, atol=1e-5)


def truncated(update, rank):
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]


def reference(model, weights, rule="task_arithmetic", rank=None, generator_seed=None, **options):
    """The merged update of `rule` at every module, from peft's float64 source updates, truncated to `rank`."""
    sources = {name: deltas(model, name) for name in NAMES[: len(weights)]}
    merged = {}
    for path in set().union(*sources.values()):
        present = [k for k, name in enumerate(sources) if path in sources[name]]
        stacked = torch.stack([sources[NAMES[k]][path] for k in present])
        generator = module_generator(generator_seed, path) if generator_seed is not None else None
        update = RULES[rule](stacked, torch.tensor([weights[k] for k in present], dtype=torch.float64), generator, **options)
        merged[path] = update if rank is None else truncated(update, rank)
    return merged


def assert_equals_reference(model, expected, atol=1e-6):
    got = deltas(model, "m")
    assert set(got) == set(expected)
    for path in got:
        torch.testing.assert_close(got[path], expected[path], rtol=1e-5, atol=atol)


def relative_error(model, expected):
    got = deltas(model, "m")
    return max(float((got[p] - expected[p]).norm() / expected[p].norm()) for p in expected)


def test_signature_is_peft_s():
    """Every argument of peft's add_weighted_adapter, in its order, with its default: a drop-in."""
    peft_parameters = list(inspect.signature(LoraModel.add_weighted_adapter).parameters.values())[1:]
    ours = list(inspect.signature(nan_peft.add_weighted_adapter).parameters.values())[1:]
    assert [(p.name, p.default) for p in ours[: len(peft_parameters)]] == [(p.name, p.default) for p in peft_parameters]
    assert [p.kind for p in ours[len(peft_parameters) :]] == [inspect.Parameter.VAR_KEYWORD]


@pytest.mark.parametrize(
    "combination_type, weights, kwargs",
    [
        ("cat", [0.7, -0.4, 1.3], {}),
        ("svd", [0.7, -0.4, 1.3], {}),
        ("svd", [0.7, -0.4, 1.3], dict(svd_rank=6, svd_full_matrices=False)),
        ("magnitude_prune_svd", [0.7, -0.4, 1.3], dict(density=0.3, svd_rank=6)),
        ("ties_svd", [1.0, 1.0, 1.0], dict(density=0.4, svd_rank=6)),
        ("ties_svd", [1.0, 1.0, 1.0], dict(density=1.0, majority_sign_method="frequency")),
    ],
)
def test_equals_peft_where_peft_is_right(same_ranks, same_modules, combination_type, weights, kwargs):
    """cat and the _svd types compute the weighted update of the rule: the same adapter as peft's, to rounding
    (ties with weights 1, where the two TIES conventions agree; frequency with three votes at every entry,
    where no vote is tied)."""
    model = same_modules if kwargs.get("majority_sign_method") == "frequency" else same_ranks
    ours, theirs = both(model, weights, combination_type, **kwargs)
    assert_same_adapter(ours, theirs)


@pytest.mark.parametrize("combination_type, weights, kwargs", [("svd", [0.7, -0.3], {}), ("ties_svd", [1.0, 1.0], dict(density=0.5))])
def test_equals_peft_on_conv1d_and_embedding_layers(combination_type, weights, kwargs):
    """GPT-2: Conv1D layers (fan_in_fan_out, peft's update transposed) and an embedding LoRA."""
    model = build(
        {"a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True),
         "b": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)},
        base=tiny_gpt2,
    )
    ours, theirs = both(model, weights, combination_type, **kwargs)
    assert_same_adapter(ours, theirs)


def drawn_masks(seed, paths, counts, shape_of, density):
    """nan-peft's DARE masks (rules.family.drop_random), one per adapter per module in peft's module order."""
    masks = []
    for path in paths:
        keep = torch.rand((counts[path], *shape_of[path]), generator=module_generator(seed, path), dtype=torch.float64) < density
        masks.extend(keep)
    return masks


@pytest.mark.parametrize("combination_type, weights", [("dare_linear_svd", [0.7, -0.4, 1.3]), ("dare_ties_svd", [1.0, 1.0, 1.0])])
def test_dare_equals_peft_with_the_same_drops(same_ranks, monkeypatch, combination_type, weights):
    """peft draws DARE's drops from torch's global generator; with nan-peft's drops (seeded per module) put in
    its place, peft's result is nan-peft's."""
    density, seed = 0.5, 3
    sources = {name: deltas(same_ranks, name) for name in NAMES}
    paths = list(lora_layers(same_ranks))  # peft's order: named_modules
    counts = {p: sum(p in sources[n] for n in NAMES) for p in paths}
    shapes = {p: next(sources[n][p].shape for n in NAMES if p in sources[n]) for p in paths}
    queue = drawn_masks(seed, paths, counts, shapes, density)

    def random_pruning(tensor, density, rescale):
        mask = queue.pop(0)
        assert mask.shape == tensor.shape
        return tensor * mask / density if rescale else tensor * mask

    monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    ours, theirs = copy.deepcopy(same_ranks), copy.deepcopy(same_ranks)
    nan_peft.add_weighted_adapter(ours, NAMES, weights, "m", combination_type=combination_type, density=density, seed=seed)
    theirs.add_weighted_adapter(NAMES, weights, "m", combination_type=combination_type, density=density)
    assert not queue
    assert_same_adapter(ours, theirs)


def test_weights_none_is_nan(same_ranks):
    """weights=None: NAN coefficients, then the same merge as peft's with those coefficients as weights."""
    ours = copy.deepcopy(same_ranks)
    result = nan_peft.add_weighted_adapter(ours, NAMES, None, "m", combination_type="svd", svd_rank=5)
    norms = torch.tensor([math.sqrt(sum(float(d.square().sum()) for d in deltas(same_ranks, n).values())) for n in NAMES])
    torch.testing.assert_close(result.coefficients.per_adapter.float(), (1 / norms) / (1 / norms).sum())
    theirs = copy.deepcopy(same_ranks)
    theirs.add_weighted_adapter(NAMES, result.coefficients.per_adapter.tolist(), "m", combination_type="svd", svd_rank=5)
    assert_same_adapter(ours, theirs)


@pytest.mark.parametrize(
    "combination_type, equivalent, rule, kwargs",
    [
        ("linear", "cat", "task_arithmetic", {}),
        ("ties", "ties_svd", "ties", dict(density=0.5)),
        ("magnitude_prune", "magnitude_prune_svd", "magnitude_prune", dict(density=0.5)),
        ("dare_linear", "dare_linear_svd", "dare_linear", dict(density=0.5)),
        ("dare_ties", "dare_ties_svd", "dare_ties", dict(density=0.5, majority_sign_method="frequency")),
    ],
)
def test_types_without_svd_merge_the_updates(same_ranks, combination_type, equivalent, rule, kwargs):
    """peft's linear / ties / magnitude_prune combine the A's and the B's separately: their product is not the
    rule's merge (off by 40% or more from peft's own _svd form, or cat for linear, here). nan-peft merges the
    updates: exact for linear (= cat), the rule on the dense updates truncated to the rank for the others (=
    the _svd form)."""
    weights = [0.6, 0.3, 0.1]
    ours, again = copy.deepcopy(same_ranks), copy.deepcopy(same_ranks)
    nan_peft.add_weighted_adapter(ours, NAMES, weights, "m", combination_type=combination_type, **kwargs)
    nan_peft.add_weighted_adapter(again, NAMES, weights, "m", combination_type=equivalent, **kwargs)
    exact, dare = rule == "task_arithmetic", rule.startswith("dare")
    assert_equals_reference(ours, reference(same_ranks, weights, rule, None if exact else 4, 0 if dare else None, **kwargs))
    for path, delta in deltas(again, "m").items():
        torch.testing.assert_close(delta, deltas(ours, "m")[path], rtol=0, atol=0)
    if not dare:  # peft's drops are random: its two forms differ anyway
        theirs, theirs_svd = copy.deepcopy(same_ranks), copy.deepcopy(same_ranks)
        theirs.add_weighted_adapter(NAMES, weights, "m", combination_type=combination_type, **kwargs)
        theirs_svd.add_weighted_adapter(NAMES, weights, "m", combination_type=equivalent, **kwargs)
        assert relative_error(theirs, deltas(theirs_svd, "m")) > 0.4


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_rslora_peft_scales_by_sqrt_rank(combination_type):
    """peft gives the new adapter use_rslora and lora_alpha = r from adapters[0]: scaling sqrt(r), not 1."""
    model = build({"a": dict(r=4, lora_alpha=8, use_rslora=True), "b": dict(r=2, lora_alpha=4)})
    weights = [0.6, 0.4]
    ours, theirs = both(model, weights, combination_type)
    rank = 6 if combination_type == "cat" else 4
    expected = reference(model, weights, rank=None if combination_type == "cat" else rank)
    assert_equals_reference(ours, expected)
    assert ours.peft_config["m"].use_rslora is False and theirs.peft_config["m"].r == rank
    for path, delta in deltas(theirs, "m").items():
        torch.testing.assert_close(delta, math.sqrt(rank) * expected[path], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "specs, error",
    [
        ({"a": dict(r=4, lora_alpha=8), "b": dict(r=2, lora_alpha=2), "c": dict(r=6, lora_alpha=3)}, ValueError),
        ({"a": dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}), "b": dict(r=4, lora_alpha=4)}, RuntimeError),
    ],
)
@pytest.mark.parametrize("combination_type", ["linear", "ties"])
def test_different_ranks(specs, error, combination_type):
    """peft refuses linear / ties for adapters of different ranks (ValueError) and fails on rank patterns that
    differ (RuntimeError from torch.stack); nan-peft merges them: exactly for linear, the rule truncated to the
    largest rank for ties."""
    model = build(specs)
    weights = [0.5, 0.3, 0.2][: len(specs)]
    with pytest.raises(error):
        copy.deepcopy(model).add_weighted_adapter(list(specs), weights, "m", combination_type=combination_type, density=0.5)
    ours = copy.deepcopy(model)
    nan_peft.add_weighted_adapter(ours, list(specs), weights, "m", combination_type=combination_type, density=0.5)
    if combination_type == "linear":
        expected = reference(model, weights)
    else:
        expected = reference(model, weights, "ties", max(s["r"] for s in specs.values()), density=0.5)
    assert_equals_reference(ours, expected)


def ties_by_peft_convention(trimmed, weights):
    """peft's disjoint merge (merge_utils.ties): signs elected on the unweighted updates, sum / number agreeing."""
    elected = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == elected
    weighted = trimmed * weights.reshape(-1, 1, 1)
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def ties_by_nan_peft_convention(trimmed, weights, frequency=False):
    """nan-peft's: signs elected on the weighted updates (by vote, a tie going to the mass, or by mass), then the
    |w_k|-weighted mean of the agreeing entries."""
    weighted = trimmed * weights.reshape(-1, 1, 1)
    mass = weighted.sum(0).sign()
    votes = weighted.sign().sum(0).sign()
    elected = torch.where(votes == 0, mass, votes) if frequency else mass
    agree = (weighted.sign() == elected) & (trimmed != 0)
    divisor = (weights.abs().reshape(-1, 1, 1) * agree).sum(0)
    return (weighted * agree).sum(0) / torch.where(divisor == 0, 1.0, divisor)


def sparsified(rule, monkeypatch, K=4, density=0.5):
    """(deltas, the generator nan-peft's rule draws DARE's drops from, the deltas as both rules sparsify them);
    peft's random_pruning is given nan-peft's drops."""
    deltas = torch.randn(K, 12, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if rule == "ties":
        return deltas, None, torch.stack([merge_utils.prune(d, density, "magnitude") for d in deltas])
    keep = torch.rand(deltas.shape, generator=module_generator(0, "x"), dtype=torch.float64) < density
    queue = list(keep)
    monkeypatch.setattr(merge_utils, "random_pruning", lambda tensor, density, rescale: tensor * queue.pop(0) / density)
    return deltas, module_generator(0, "x"), deltas * keep / density


@pytest.mark.parametrize("rule", ["ties", "dare_ties"])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_rules_against_peft_merge_utils(monkeypatch, rule, method):
    """With weights 1 (the TIES paper's disjoint mean) nan-peft's ties and dare_ties are peft's merge_utils', for
    both sign elections, but for frequency's tied votes (as many adapters for as against), which nan-peft gives
    to the mass and peft to +1. With other weights each follows its own convention (see
    nan_peft.weighted_adapter), and they differ."""
    peft_rule = getattr(merge_utils, rule)
    frequency = method == "frequency"
    for weights in ([1.0] * 4, [2.0, 1.0, 0.5, -1.0]):
        weights = torch.tensor(weights, dtype=torch.float64)
        deltas, generator, sparse = sparsified(rule, monkeypatch)
        ours = RULES[rule](deltas, weights, generator, density=0.5, majority_sign_method=method)
        peft = peft_rule(list(deltas), weights, 0.5, method)
        torch.testing.assert_close(ours, ties_by_nan_peft_convention(sparse, weights, frequency), rtol=1e-12, atol=0)
        if weights.eq(1).all():
            tied = (sparse.sign().sum(0) == 0) & (sparse != 0).any(0) & frequency
            assert tied.any() or not frequency
            torch.testing.assert_close(ours[~tied], peft[~tied], rtol=1e-12, atol=0)
        else:
            if not frequency:
                torch.testing.assert_close(peft, ties_by_peft_convention(sparse, weights), rtol=1e-12, atol=0)
            assert (ours - peft).abs().max() > 0.1


def test_ties_weights_scale_peft_s_merge_not_nan_peft_s(same_ranks):
    """Equal weights 0.5: peft's ties_svd is half of the weights-1 merge (its weights act as lambda), nan-peft's
    is the weights-1 merge (a weighted mean; its scale option is lambda)."""
    half_ours, half_theirs = both(same_ranks, [0.5, 0.5, 0.5], "ties_svd", density=0.5)
    ones_ours, _ = both(same_ranks, [1.0, 1.0, 1.0], "ties_svd", density=0.5)
    for path, delta in deltas(ones_ours, "m").items():
        torch.testing.assert_close(deltas(half_ours, "m")[path], delta, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(deltas(half_theirs, "m")[path], 0.5 * delta, rtol=1e-5, atol=1e-6)
    scaled = copy.deepcopy(same_ranks)
    nan_peft.add_weighted_adapter(scaled, NAMES, [0.5, 0.5, 0.5], "m", combination_type="ties_svd", density=0.5, scale=0.5)
    assert_same_adapter(scaled, half_theirs)


def test_one_adapter_is_its_weighted_update(same_ranks):
    """Like peft, one adapter gives its weighted update exactly whatever the type (peft switches to linear)."""
    ours, theirs = copy.deepcopy(same_ranks), copy.deepcopy(same_ranks)
    nan_peft.add_weighted_adapter(ours, ["b"], [-0.5], "m", combination_type="ties", density=0.2)
    theirs.add_weighted_adapter(["b"], [-0.5], "m", combination_type="ties", density=0.2)
    assert_same_adapter(ours, theirs)
    for path, delta in deltas(ours, "m").items():
        torch.testing.assert_close(delta, -0.5 * deltas(same_ranks, "b")[path], rtol=1e-6, atol=1e-8)


def test_errors(same_ranks):
    model = copy.deepcopy(same_ranks)
    with pytest.raises(NanPeftError, match="svd_clamp"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "m", svd_clamp=0.99)
    with pytest.raises(NanPeftError, match="unknown combination_type 'mean'"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "m", combination_type="mean")
    with pytest.raises(NanPeftError, match="unknown majority_sign_method 'votes'"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "m", combination_type="ties", density=0.5, majority_sign_method="votes")
    with pytest.raises(NanPeftError, match="rank is set by peft's argument svd_rank"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "m", rank=4)
    with pytest.raises(NanPeftError, match="ties rule: needs density"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "m", combination_type="ties")
    with pytest.raises(NanPeftError, match="takes the PeftModel"):
        nan_peft.add_weighted_adapter(model.base_model, NAMES, None, "m")
    with pytest.raises(NanPeftError, match="already has an adapter named 'a'"):
        nan_peft.add_weighted_adapter(model, NAMES, None, "a")
    with pytest.raises(NanPeftError, match="got 2 weights for 3 adapters"):
        nan_peft.add_weighted_adapter(model, NAMES, [1.0, 1.0], "m")
    assert "m" not in model.peft_config


def test_import_nan_peft_does_not_import_peft():
    """add_weighted_adapter is exported lazily: import nan_peft stays free of peft (and transformers)."""
    code = "import sys, nan_peft; assert 'peft' not in sys.modules and 'add_weighted_adapter' in nan_peft.__all__"
    subprocess.run([sys.executable, "-c", code], check=True)
