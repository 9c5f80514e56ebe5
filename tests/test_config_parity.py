"""nan-peft reads an adapter exactly as peft loads it (issue 16): every config field it reads, and which saved
factors peft applies (target_modules, exclude_modules, layers_to_transform / layers_pattern, modules_to_save).

The differential test generates many configs (valid and invalid values of every targeting and scale field) and
saved factors, and for each one either peft loads every saved factor into a tiny Llama built from a config and
nan-peft's one-adapter merge (weight 1) gives peft's get_delta_weight at every module peft adapts, or peft
fails or drops saved factors and nan-peft refuses in one line. nan-peft is stricter than peft on purpose in a
few listed cases (STRICTER: a value outside the type peft's LoraConfig declares, which peft happens to tolerate;
a null target_modules, whose meaning depends on the model's architecture; alpha <= 0; variants whose update is
not s * B @ A, such as DoRA); there a refusal must name the field. One failure of peft's needs the model to
foresee (needs_the_model: modules_to_save naming a module the model has and the file does not hold); it is
counted, not asserted. Configs keep init_lora_weights such that a module peft adapts without saved factors
gets no update (B = 0), as peft's save always holds every adapted module.
Seeded and bounded: NAN_PEFT_PARITY_EXAMPLES (default 240), NAN_PEFT_PARITY_SEED (default 16).
"""

import copy
import json
import os
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from models import make_adapter
from oracle import peft_deltas
from nan_peft import NanPeftError, merge_adapters, read_adapter

EXAMPLES = int(os.environ.get("NAN_PEFT_PARITY_EXAMPLES", "240"))
SEED = int(os.environ.get("NAN_PEFT_PARITY_SEED", "16"))
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


BASE = tiny_model()
SHAPES = {name: (type(m), tuple(m.weight.shape)) for name, m in BASE.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}

DEFAULTS = {
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tiny", "r": 2, "lora_alpha": 4,
    "target_modules": ["q_proj", "v_proj"], "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None,
    "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "fan_in_fan_out": False,
    "bias": "none", "init_lora_weights": True, "lora_dropout": 0.0, "ensure_weight_tying": False,
}
# Values each field is drawn from: (what peft saves or a user writes, what a typo or a broken file holds).
POOLS = {
    "target_modules": (
        [["q_proj", "v_proj"], ["q_proj"], ["self_attn.q_proj", "mlp.down_proj"], ["model.layers.0.self_attn.q_proj", "k_proj"],
         ["embed_tokens", "o_proj"], ["lm_head", "up_proj"], "all-linear", "ALL-Linear", r".*\.q_proj",
         r"model\.layers\.1\..*_proj", r".*\.(q|v|gate)_proj", ".*"],
        [["proj"], ["elf_attn.q_proj"], [], ["all-linear"], "q_proj", "8", "(", None, 3.5, {}, [3], {"q_proj": 1}, ["q_proj", None]],
    ),
    "exclude_modules": ([None, [], ["v_proj"], ["model.layers.1.self_attn.q_proj"], ".*down_proj", "v_proj", ""],
                        ["(", [1], {"v_proj": 1}]),
    "layers_to_transform": ([None, 0, 1, [0], [1], [0, 1], [1, 0], []], [5, [5], [-1], 1e9, "8", True, [1.0], 1.0, {}, [[0]]]),
    "layers_pattern": ([None, "layers", ["layers"], ["h", "layers"], "", []], ["h", "self_attn", 3, "(", ["layers", 0]]),
    "modules_to_save": ([None, [], ["classifier"], ["score", "classifier"]], [["q_proj"], ["self_attn"], ["layers.1"], "xyz", [3], ["a b"]]),
    "task_type": ([None, "CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS"], ["bogus", 3]),
    "rank_pattern": ([{}, {"q_proj": 3}, {r"layers\.1\.self_attn\.v_proj": 1}], [{"q_proj": 2.0}, {"(": 2}, {"v_proj": 0}, None, []]),
    "alpha_pattern": ([{}, {"v_proj": 3}, {"q_proj": 0.5}, {r"model\.layers\.0\..*": 8}], [{"q_proj": "x"}, {"q_proj": -1}, None, []]),
    "r": ([2, 3, 1], [4.0, 0, -1, True, "2", None]),
    "lora_alpha": ([4, 3.5, 16], [0, -2, "8", None, True]),
    "use_rslora": ([False, True, None], ["yes", 1]),
    "fan_in_fan_out": ([False, True, None], ["no"]),
    "ensure_weight_tying": ([False, None], ["yes"]),
    "use_dora": ([False, None], [True]),
    "bias": (["none"], ["all", "lora_only"]),
    "init_lora_weights": ([True, "gaussian"], ["pissa", "olora"]),
    "peft_type": (["LORA"], ["IA3", "lora", None]),
    "base_model_name_or_path": (["tiny", None], [["a"], 3]),
}
TARGETING = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _names(v):
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


# Where nan-peft refuses what peft loads, deliberately: the value is outside the type peft's LoraConfig declares
# (peft tuners/lora/config.py) though peft's code happens to tolerate it, or its meaning needs the model.
STRICTER = {
    "target_modules": lambda v: v is None or not (isinstance(v, str) or _names(v)),
    "exclude_modules": lambda v: not (v is None or isinstance(v, str) or _names(v)),
    "layers_to_transform": lambda v: not (v is None or _int(v) or (isinstance(v, list) and all(_int(i) for i in v))),
    "layers_pattern": lambda v: not (v is None or isinstance(v, str) or _names(v)),
    "modules_to_save": lambda v: bool(v) and not (_names(v) and all(re.fullmatch(r"[\w.\-]+", n) for n in v)),  # names only
    "r": lambda v: not (_int(v) and v > 0),
    "lora_alpha": lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0,
    "rank_pattern": lambda v: not isinstance(v, dict) or any(not (_int(x) and x > 0) for x in v.values()),
    "alpha_pattern": lambda v: not isinstance(v, dict) or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 for x in v.values()),
    "use_rslora": lambda v: not isinstance(v, (bool, type(None))),
    "fan_in_fan_out": lambda v: not isinstance(v, (bool, type(None))),
    "ensure_weight_tying": lambda v: not isinstance(v, (bool, type(None))),
    "base_model_name_or_path": lambda v: not isinstance(v, (str, type(None))),
    # variants whose update is not s * B @ A (or not of the original base): refused whatever peft does
    "use_dora": bool,
    "bias": lambda v: v != "none",
    "init_lora_weights": lambda v: v in ("pissa", "olora"),
    "peft_type": lambda v: v != "LORA",
}


def draw_config(rng: random.Random) -> dict:
    config = copy.deepcopy(DEFAULTS)
    fields = rng.sample(sorted(POOLS), rng.randint(1, 3))
    fields += [f for f in TARGETING if rng.random() < 0.3 and f not in fields]
    for field in fields:
        usual, odd = POOLS[field]
        config[field] = copy.deepcopy(rng.choice(odd if rng.random() < 0.3 else usual))
    return config


def peft_targets(config: dict) -> set[str] | None:
    """The modules peft adapts for `config` on the tiny model, by peft's own matching function, or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type",)})
            lora = _maybe_include_all_linear_layers(lora, BASE)
            return {name for name in SHAPES if check_target_module_exists(lora, name)}
    except Exception:  # noqa: BLE001 - an invalid config: the saved modules are drawn at random instead
        return None


def draw_factors(config: dict, rng: random.Random, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Factors as peft saves them, for the modules peft would adapt (give or take one), at the config's ranks
    (give or take one)."""
    modules = peft_targets(config)
    names = sorted(SHAPES)
    if not modules or rng.random() < 0.1:
        modules = set(rng.sample(names, rng.randint(1, 4)))
    modules = set(modules)
    if rng.random() < 0.15:
        modules.add(rng.choice(names))
    if len(modules) > 1 and rng.random() < 0.1:
        modules.discard(rng.choice(sorted(modules)))
    r, pattern = config.get("r"), config.get("rank_pattern")
    state = {}
    for path in sorted(modules):
        rank = r if _int(r) and r > 0 else 2
        if isinstance(pattern, dict) and pattern:
            try:
                rank = pattern.get(get_pattern_key(list(pattern), path), rank)
            except Exception:  # noqa: BLE001 - a bad regex key
                pass
        rank = rank if _int(rank) and 0 < rank < 8 else 2
        rank += 1 if rng.random() < 0.05 else 0
        kind, (out, fan_in) = SHAPES[path]
        prefix = f"base_model.model.{path}"
        if kind is torch.nn.Embedding:  # weight (num_embeddings, dim); peft: A (r, num_embeddings), B (dim, r)
            state[f"{prefix}.lora_embedding_A"] = torch.randn(rank, out, generator=generator) * 0.3
            state[f"{prefix}.lora_embedding_B"] = torch.randn(fan_in, rank, generator=generator) * 0.3
        else:
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) * 0.3
            state[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator) * 0.3
    return state


def peft_outcome(folder: Path, saved: set[str]):
    """({module: get_delta_weight as an (out, in) matrix} over every module peft adapts, None) when peft
    loads every saved factor; (None, why) when it fails or drops saved factors."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(copy.deepcopy(BASE), folder)
            deltas = {path: per_adapter["default"] for path, per_adapter in peft_deltas(model).items()}
    except Exception as error:  # noqa: BLE001 - any failure of peft's is an outcome
        return None, f"peft raised {type(error).__name__}: {str(error)[:120]}"
    if saved - set(deltas):
        return None, f"peft dropped the factors of {sorted(saved - set(deltas))}"
    return deltas, None


def nan_peft_outcome(folder: Path):
    try:
        result = merge_adapters([folder], weights=[1.0])
    except NanPeftError as error:
        return None, str(error)
    return {path: module.delta() for path, module in result.adapter.modules.items()}, None


def needs_the_model(config: dict, peft_says: str, saved: set[str]) -> bool:
    """peft failed on a missing weight of a module that modules_to_save names, a module the model has and the
    file does not hold. The same file loads in peft into a model without such a module (and peft saves every
    module it wraps), so only the model can tell: nan-peft reads the adapter, which makes no update there."""
    match = re.fullmatch(r"peft raised KeyError: '(?:base_model\.model\.)?(.+)\.[^.]+'", peft_says)
    names = config.get("modules_to_save")
    if match is None or not _names(names):
        return False
    inside = [name for name in names if f".{name}." in f".{match[1]}."]
    return bool(inside) and not any(f".{name}." in f".{path}." for name in inside for path in saved)


def excused(config: dict, message: str) -> bool:
    return any(check(config.get(field, DEFAULTS.get(field))) and field in message for field, check in STRICTER.items())


def test_nan_peft_reads_adapters_as_peft_loads_them(tmp_path):
    rng = random.Random(SEED)
    generator = torch.Generator().manual_seed(SEED)
    outcomes = {"same update": 0, "both refuse": 0, "stricter": 0, "needs the model": 0}
    for example in range(EXAMPLES):
        config = draw_config(rng)
        state = draw_factors(config, rng, generator)
        folder = tmp_path / f"a{example}"
        folder.mkdir()
        (folder / CONFIG).write_text(json.dumps(config))
        save_file(state, folder / WEIGHTS)
        saved = {key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for key in state}
        what = f"example {example}: {json.dumps(config)} with factors for {sorted(saved)}"
        expected, peft_says = peft_outcome(folder, saved)
        got, refusal = nan_peft_outcome(folder)
        if refusal is not None:
            assert "\n" not in refusal and str(folder) in refusal, f"{what}: {refusal!r}"
        if expected is None and refusal is None and needs_the_model(config, peft_says, saved):
            outcomes["needs the model"] += 1
        elif expected is None:
            assert refusal is not None, f"{what}: {peft_says}, but nan-peft merged {sorted(got)}"
            outcomes["both refuse"] += 1
        elif refusal is not None:
            assert excused(config, refusal), f"{what}: peft loads it, nan-peft refused: {refusal}"
            outcomes["stricter"] += 1
        else:
            assert set(got) <= set(expected), what
            for path, delta in expected.items():
                mine = got.get(path, torch.zeros_like(delta))  # a module peft adapts but the file does not fill: B = 0
                torch.testing.assert_close(mine, delta, rtol=1e-5, atol=1e-7, msg=lambda m, p=path: f"{what}: {p}: {m}")
            outcomes["same update"] += 1
    assert outcomes["same update"] > 0.15 * EXAMPLES and outcomes["both refuse"] > 0.3 * EXAMPLES, outcomes


# ---------------------------------------------------------------- the examples, one by one

@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """A real peft adapter with factors for q_proj and v_proj in layers 0 and 1 of tiny Llama."""
    return make_adapter(tmp_path_factory.mktemp("parity") / "two_layers", seed=21, magnitude=0.2)


def edited(source: Path, tmp_path: Path, **fields) -> Path:
    folder = tmp_path / "edited"
    folder.mkdir(parents=True)
    config = json.loads((source / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))
    (folder / WEIGHTS).write_bytes((source / WEIGHTS).read_bytes())
    return folder


def peft_adapts(folder: Path) -> set[str] | str:
    """The modules peft wraps with the adapter, or the name of the exception it raises."""
    from models import tiny_llama

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(tiny_llama(), folder)
    except Exception as error:  # noqa: BLE001
        return type(error).__name__
    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def refusal(folder: Path) -> str:
    with pytest.raises(NanPeftError) as error:
        read_adapter(folder)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{folder}: "), message
    return message


LAYER = "model.layers.{}.self_attn.{}_proj"


def test_layers_to_transform_beyond_the_saved_layers(two_layers, tmp_path):
    """[5] with factors for layers 0 and 1: peft finds no target in the tiny model and refuses."""
    folder = edited(two_layers, tmp_path, layers_to_transform=[5])
    assert peft_adapts(folder) == "NoMatchingPeftModuleError"
    message = refusal(folder)
    assert "peft would load none of its factors" in message
    assert f"factors for {LAYER.format(0, 'q')}, which is in layer 0, which layers_to_transform [5] leaves out" in message


def test_layers_to_transform_naming_one_saved_layer(two_layers, tmp_path):
    """[0] with factors for layers 0 and 1: peft applies layer 0 only and drops layer 1's factors."""
    folder = edited(two_layers, tmp_path, layers_to_transform=[0])
    assert peft_adapts(folder) == {LAYER.format(0, "q"), LAYER.format(0, "v")}
    message = refusal(folder)
    assert "none of its factors" not in message
    assert f"factors for {LAYER.format(1, 'q')}, which is in layer 1, which layers_to_transform [0] leaves out" in message
    # an int is one layer, as in peft; layers_pattern names the layer list
    assert "layers_to_transform 0 leaves out" in refusal(edited(two_layers, tmp_path / "int", layers_to_transform=0))
    for i, pattern in enumerate(("h", ["h"])):
        message = refusal(edited(two_layers, tmp_path / f"h{i}", layers_to_transform=[0, 1], layers_pattern=pattern))
        assert f"has no layer index that peft finds for layers_to_transform [0, 1] with layers_pattern {pattern!r}" in message


def test_string_target_is_a_full_match_regex(two_layers, tmp_path):
    """"8" matches no module path in full: peft refuses the config; so does nan-peft."""
    folder = edited(two_layers, tmp_path, target_modules="8")
    assert peft_adapts(folder) == "NoMatchingPeftModuleError"
    assert "target_modules '8' does not full-match" in refusal(folder)
    partial = edited(two_layers, tmp_path / "partial", target_modules=r".*\.q_proj")  # v_proj factors: dropped by peft
    assert peft_adapts(partial) == {LAYER.format(0, "q"), LAYER.format(1, "q")}
    assert f"factors for {LAYER.format(0, 'v')}, which target_modules '.*\\\\.q_proj' does not full-match" in refusal(partial)


@pytest.mark.parametrize("field,value,message", [
    ("target_modules", 3.5, "target_modules=3.5; expected a list of module names or a regex"),
    ("target_modules", {}, "target_modules={}; expected a list of module names or a regex"),
    ("layers_to_transform", 1e9, "layers_to_transform=1000000000.0; expected a layer index or a list of them"),
    ("layers_to_transform", "8", "layers_to_transform='8'; expected a layer index or a list of them"),
    ("rank_pattern", [], r"rank_pattern=[]; expected an object mapping module patterns to numbers"),
])
def test_values_of_the_wrong_type(two_layers, tmp_path, field, value, message):
    """Values peft's LoraConfig or loader crash on, or that make it adapt nothing."""
    folder = edited(two_layers, tmp_path, **{field: value})
    assert isinstance(peft_adapts(folder), str)
    assert refusal(folder).endswith(f"adapter_config.json has {message}")


@pytest.mark.parametrize("fields,rule", [
    (dict(exclude_modules=["v_proj"]), "which exclude_modules (v_proj) names"),
    (dict(exclude_modules=".*\\.1\\..*"), "which exclude_modules '.*\\\\.1\\\\..*' full-matches"),
    (dict(modules_to_save=["self_attn"]), "which lies in modules_to_save module 'self_attn' (peft never adapts those)"),
    (dict(target_modules=["lm_head", "k_proj"]), "which target_modules (lm_head, k_proj) does not name"),
    (dict(target_modules=["all-linear"]), "which target_modules (all-linear) does not name"),
])
def test_other_rules_name_the_module_and_the_rule(two_layers, tmp_path, fields, rule):
    folder = edited(two_layers, tmp_path, **fields)
    assert peft_adapts(folder) != {LAYER.format(i, p) for i in (0, 1) for p in "qv"}
    assert rule in refusal(folder)


@pytest.mark.parametrize("fields", [
    dict(target_modules=r"model\.layers\.\d\.self_attn\.(q|v)_proj"),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "v_proj", "k_proj"], layers_to_transform=[1, 0], layers_pattern="layers"),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "q_proj", "v_proj"], layers_to_transform=1),
    dict(exclude_modules=["k_proj"], layers_to_transform=[]),
])
def test_configs_peft_applies_in_full_read_the_same(two_layers, tmp_path, fields):
    """Exact names skip the layer rule, an empty list means every layer, all-linear covers Linear layers."""
    folder = edited(two_layers, tmp_path, **fields)
    assert {LAYER.format(i, p) for i in (0, 1) for p in "qv"} <= peft_adapts(folder)
    assert len(read_adapter(folder).modules) == 4


def test_all_linear_leaves_out_embeddings_and_the_output_layer(tmp_path):
    embedding = make_adapter(tmp_path / "e", seed=3, target_modules=["q_proj", "embed_tokens"])
    head = make_adapter(tmp_path / "h", seed=4, target_modules=["q_proj", "lm_head"])
    for source, rule in ((embedding, "model.embed_tokens, which is an embedding layer, and target_modules 'all-linear' adapts"),
                         (head, "lm_head, which is the output layer, which target_modules 'all-linear' leaves out")):
        folder = edited(source, tmp_path / source.name, target_modules="all-linear")
        assert rule.split(",")[0] not in peft_adapts(folder)
        assert rule in refusal(folder)


def test_reading_imports_neither_peft_nor_transformers(two_layers):
    code = (f"import sys, nan_peft; nan_peft.read_adapter({str(two_layers)!r}); "
            "print(sorted(m for m in ('peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pattern_key_is_peft_get_pattern_key():
    from nan_peft.targeting import pattern_key

    keys = ["q_proj", r"layers\.1\..*", "model.layers.0.mlp.down_proj", "proj"]
    for path in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.0.mlp.down_proj", "lm_head", "x.proj"]:
        assert pattern_key(keys, path) == get_pattern_key(keys, path)
