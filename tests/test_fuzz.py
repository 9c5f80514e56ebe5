"""A bounded, deterministic fuzz of read_adapter (issue 8): damaged adapters load exactly or are refused.

Each example damages a valid adapter and reads it back. The only acceptable outcomes are a NanPeftError
with a one-line message naming the folder, or an adapter whose factors, scales and carried tensors are
exactly the original's (for config edits: exactly what the edited config says, by peft's rules). Any
other exception type, or different numbers, fails the test with the seed-determined example that did it.

What is fuzzed where, and why:
- a plain PEFT safetensors file has no checksum, so a flipped bit in its tensor data loads as a different
  number and nothing can tell; its fuzz damages the header anywhere (flips, overwrites, insertions,
  deletions, the length prefix) and the length (truncation, appended bytes) with one corruption each;
- a file nan-peft wrote carries a sha256 of its tensors and scale fields: it gets one corruption anywhere
  (one that hits the checksum's own metadata key leaves the data intact), or several inside the tensor
  data, which must all be refused;
- the config: random JSON edits (values of every type, deleted and added keys, nested patterns) and raw
  byte damage; a plain config edit is a different valid adapter, so the loaded scales must follow it.

Examples per test: NAN_PEFT_FUZZ_EXAMPLES (default 250); seed: NAN_PEFT_FUZZ_SEED (default 8), fixed, so
every run is the same. A longer local run:
    NAN_PEFT_FUZZ_EXAMPLES=20000 NAN_PEFT_FUZZ_SEED=1 pytest tests/test_fuzz.py
"""

import json
import math
import os
import random
import re
import shutil
import struct

import pytest
import torch
from peft.utils.other import get_pattern_key

from nan_peft import NanPeftError, merge_adapters, read_adapter

EXAMPLES = int(os.environ.get("NAN_PEFT_FUZZ_EXAMPLES", "250"))
SEED = int(os.environ.get("NAN_PEFT_FUZZ_SEED", "8"))
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


ALL_OPS = ("flip", "flip", "byte", "chunk", "truncate", "append", "insert", "delete", "length")
IN_PLACE = ("flip", "byte", "chunk")


def corrupt(data: bytes, rng: random.Random, region: tuple[int, int], ops=ALL_OPS) -> tuple[bytes, str]:
    """One corruption: in-place ones (flip, overwrite, copied chunk) inside `region`; length-changing ones
    (truncate, append, insert, delete) anywhere, since they break the offsets the header declares."""
    d = bytearray(data)
    lo, hi = region
    op = rng.choice(ops)
    k = rng.randrange(lo, hi)
    if op == "flip":
        bit = rng.randrange(8)
        d[k] ^= 1 << bit
        return bytes(d), f"flip bit {bit} of byte {k}"
    if op == "byte":
        d[k] = rng.randrange(256)
        return bytes(d), f"byte {k} = {d[k]}"
    if op == "chunk":
        n = min(rng.randint(1, 16), len(d) - k)
        src = rng.randrange(len(d) - n)
        d[k : k + n] = d[src : src + n]
        return bytes(d[: len(data)]), f"copy {n} bytes from {src} to {k}"
    if op == "length":
        value = rng.choice([0, 1, len(d), 2**63, struct.unpack("<Q", data[:8])[0] + rng.choice([-8, -1, 1, 8])])
        d[:8] = struct.pack("<Q", value % 2**64)
        return bytes(d), f"header length {value}"
    k = rng.randrange(len(d))
    if op == "truncate":
        return bytes(d[:k]), f"truncate to {k}"
    if op == "append":
        return bytes(d) + rng.randbytes(rng.randint(1, 16)), "append"
    if op == "insert":
        d[k:k] = rng.randbytes(rng.randint(1, 4))
        return bytes(d), f"insert at {k}"
    del d[k : k + rng.randint(1, 4)]
    return bytes(d), f"delete at {k}"


def check(folder, original, what, expected_scales=None, must_refuse=False):
    """read_adapter(folder) is refused with a one-line NanPeftError naming it, or (unless must_refuse) equals
    `original` exactly, with `expected_scales` instead of the original's scales when given.
    Returns "loaded" or "refused"."""
    try:
        adapter = read_adapter(folder)
    except NanPeftError as error:
        message = str(error)
        assert "\n" not in message and str(folder) in message, f"{what}: {message!r}"
        return "refused"
    except Exception as error:  # noqa: BLE001 - any other type is the bug this fuzz looks for
        raise AssertionError(f"{what}: {type(error).__name__} escaped read_adapter: {error}") from error
    assert not must_refuse, f"{what}: loaded an adapter that is not a plain LoRA update"
    assert adapter.modules.keys() == original.modules.keys(), what
    for path, module in original.modules.items():
        loaded = adapter.modules[path]
        assert loaded.A.dtype == module.A.dtype and torch.equal(loaded.A, module.A), f"{what}: {path} lora_A"
        assert loaded.B.dtype == module.B.dtype and torch.equal(loaded.B, module.B), f"{what}: {path} lora_B"
        scale = module.scale if expected_scales is None else expected_scales[path]
        assert loaded.scale == scale, f"{what}: {path} scale {loaded.scale} != {scale}"
        assert (loaded.kind, loaded.a_tail, loaded.b_tail) == (module.kind, module.a_tail, module.b_tail), what
    assert adapter.extras.keys() == original.extras.keys(), what
    assert all(torch.equal(adapter.extras[k], t) for k, t in original.extras.items()), what
    return "loaded"


def fuzz_weights(source, tmp_path, region_of, examples, ops_per_example=(1, 1), ops=ALL_OPS):
    original = read_adapter(source)
    folder = tmp_path / "fuzzed"
    shutil.copytree(source, folder)
    data = (source / WEIGHTS).read_bytes()
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for example in range(examples):
        damaged, what = data, []
        for _ in range(rng.randint(*ops_per_example)):
            damaged, step = corrupt(damaged, rng, region_of(damaged), ops)
            what.append(step)
        (folder / WEIGHTS).write_bytes(damaged)
        outcome = check(folder, original, f"example {example}: {', '.join(what)}")
        outcomes[outcome if damaged != data else "unchanged"] = outcomes.get(outcome if damaged != data else "unchanged", 0) + 1
    return outcomes


@pytest.fixture(scope="module")
def peft_adapter(llama_adapters):
    return llama_adapters[2]  # rsLoRA, an embedding LoRA and a carried embedding weight


@pytest.fixture(scope="module")
def written_adapter(llama_adapters, tmp_path_factory):
    folder = tmp_path_factory.mktemp("written") / "merged"
    merge_adapters(llama_adapters[:3], combine="svd", rank=6).save_pretrained(folder)
    return folder


def test_fuzz_peft_safetensors_header_and_length(peft_adapter, tmp_path):
    outcomes = fuzz_weights(peft_adapter, tmp_path, lambda d: (0, header_end(d)), EXAMPLES)
    assert outcomes["refused"] > 0.9 * EXAMPLES, outcomes  # nearly every header corruption is structural


def test_fuzz_checksummed_safetensors_anywhere(written_adapter, tmp_path):
    outcomes = fuzz_weights(written_adapter, tmp_path, lambda d: (0, len(d)), EXAMPLES)
    assert outcomes["refused"] > 0.9 * EXAMPLES, outcomes


def test_fuzz_checksummed_tensor_data_several_corruptions(written_adapter, tmp_path):
    data = (written_adapter / WEIGHTS).read_bytes()
    start = header_end(data)
    outcomes = fuzz_weights(written_adapter, tmp_path, lambda d: (start, len(d)), EXAMPLES // 2, (2, 4), IN_PLACE)
    assert outcomes["loaded"] == 0 and outcomes["refused"] > 0, outcomes  # any change of the data changes numbers


# ---------------------------------------------------------------- config edits

VALUES = [
    None, True, False, 0, -1, 1, 2, 3, 4, 6, 8, 16, 0.5, 1.5, 4.0, 1e-300, 1e308, 10**30, 10**400,
    math.nan, math.inf, -math.inf, "", "4", "LORA", "IA3", "none", "all", "q_proj", "CAUSAL_LM", "(", "a\nb",
    [], [1], ["q_proj", "v_proj"], {}, {"q_proj": 2}, {"v_proj": 4}, {"k_proj": 3.0}, {"embed_tokens": 8},
    {"q_proj": "x"}, {"(": 2}, {"layers\\.0\\..*": 6}, [[[[[]]]]],
]
MATH_KEYS = ["r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "peft_type"]


def edit_config(config: dict, rng: random.Random) -> tuple[dict, str]:
    config = json.loads(json.dumps(config))
    op = rng.choice(["set_math", "set_math", "set_any", "delete", "add", "pattern"])
    if op == "set_math" or op == "set_any":
        key = rng.choice(MATH_KEYS if op == "set_math" else sorted(config))
        config[key] = rng.choice(VALUES)
        return config, f"{key} = {config[key]!r}"
    if op == "delete":
        key = rng.choice(sorted(config))
        del config[key]
        return config, f"delete {key}"
    if op == "add":
        key = rng.choice(["use_dora", "lora_bias", "modules_to_save", "layer_replication", "x", "megatron_config"])
        config[key] = rng.choice(VALUES)
        return config, f"add {key} = {config[key]!r}"
    field = rng.choice(["rank_pattern", "alpha_pattern"])
    pattern = config.get(field) if isinstance(config.get(field), dict) else {}
    key = rng.choice(["q_proj", "v_proj", "k_proj", "embed_tokens", "layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "proj"])
    pattern[key] = rng.choice([1, 2, 3, 4, 6, 8, 0.5, 12.0, -2, "6", None])
    config[field] = pattern
    return config, f"{field}[{key!r}] = {pattern[key]!r}"


NOT_PLAIN = ("use_dora", "lora_bias", "layer_replication")  # the variants edit_config can add


def valid_modules_to_save(value) -> bool:
    """modules_to_save naming modules (none of which this adapter saves) changes nothing; anything else is refused."""
    names = [value] if isinstance(value, str) else value
    return not value or (isinstance(names, list) and all(isinstance(n, str) and re.fullmatch(r"[\w.\-]+", n) for n in names))


def expected_scales(config: dict, original) -> dict[str, float] | None:
    """What peft makes of `config` for each module, or None where it is not a plain LoRA update of these
    factors (then the only right answer is a refusal). Scales follow peft: get_pattern_key over rank_pattern
    and alpha_pattern (LoraModel), then alpha / r, or alpha / sqrt(r) with use_rslora (LoraLayer.update_layer)."""
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none" or any(config.get(k) for k in NOT_PLAIN):
        return None
    if not valid_modules_to_save(config.get("modules_to_save")):
        return None
    scales = {}
    try:
        for path in original.modules:
            rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
            r = rank_pattern.get(get_pattern_key(list(rank_pattern), path), config["r"])
            alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), config["lora_alpha"])
            if r != original.modules[path].rank:
                return None
            scales[path] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    except Exception:  # noqa: BLE001 - peft could not apply it either
        return None
    return scales


def test_fuzz_config_edits(peft_adapter, tmp_path):
    original = read_adapter(peft_adapter)
    config = json.loads((peft_adapter / CONFIG).read_text())
    folder = tmp_path / "fuzzed"
    shutil.copytree(peft_adapter, folder)
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for example in range(EXAMPLES):
        edited, what = edit_config(config, rng)
        for _ in range(rng.randint(0, 2)):
            edited, more = edit_config(edited, rng)
            what += f"; {more}"
        (folder / CONFIG).write_text(json.dumps(edited))
        scales = expected_scales(edited, original)
        outcomes[check(folder, original, f"example {example}: {what}", scales, must_refuse=scales is None)] += 1
    assert outcomes["loaded"] > 0.1 * EXAMPLES and outcomes["refused"] > 0.1 * EXAMPLES, outcomes


def test_fuzz_config_bytes(peft_adapter, tmp_path):
    original = read_adapter(peft_adapter)
    text = (peft_adapter / CONFIG).read_bytes()
    folder = tmp_path / "fuzzed"
    shutil.copytree(peft_adapter, folder)
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for example in range(EXAMPLES):
        damaged, what = corrupt(text, rng, (0, len(text)))
        (folder / CONFIG).write_bytes(damaged)
        try:
            scales = expected_scales(json.loads(damaged), original)
        except ValueError:  # not JSON at all
            scales = None
        outcomes[check(folder, original, f"example {example}: {what}", scales, must_refuse=scales is None)] += 1
    assert outcomes["loaded"] > 0 and outcomes["refused"] > 0.5 * EXAMPLES, outcomes
