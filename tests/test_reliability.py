"""Bad input never yields a wrong adapter, a lost file or code execution (issue 8).

Complements test_reader.py / test_merge.py (which already cover DoRA & co., NaN factors, missing files,
rank/r mismatches, option errors, all-zero updates under NAN, single adapters, overwrite and repeat runs).
"""

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import LLAMA, make_adapter
from nan_peft import LoraAdapter, LoraModule, NanPeftError, merge_adapters, read_adapter, read_adapters, update_gram, write_adapter
from nan_peft.reader import CHECKSUM_KEY
from nan_peft.publish import _HOST, publish_folder, remove_stale_temporaries
from oracle import load_sources, peft_deltas

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TESTS = Path(__file__).parent
REPO = TESTS.parent


# ---------------------------------------------------------------- helpers

def copy(source, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(source, folder)
    return folder


def set_config(folder, **fields):
    config = json.loads((folder / CONFIG).read_text())
    config.update(fields)
    (folder / CONFIG).write_text(json.dumps(config))  # allow_nan: writes NaN / Infinity tokens as Python does
    return folder


def refused(folder, match):
    """read_adapter(folder) raises NanPeftError with a one-line message naming the folder and matching `match`."""
    with pytest.raises(NanPeftError, match=match) as error:
        read_adapter(folder)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message, message
    return message


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): equal digests mean nothing was added, removed or changed."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(folder.rglob("*"))
    }


def assert_same_adapter(a, b):
    assert a.modules.keys() == b.modules.keys()
    for path, x in a.modules.items():
        y = b.modules[path]
        assert x.scale == y.scale and x.A.dtype == y.A.dtype
        assert torch.equal(x.A, y.A) and torch.equal(x.B, y.B), path


def update(module):
    return module.scale * (module.B.double() @ module.A.double())


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


# ---------------------------------------------------------------- bad folders and configs

def test_empty_folder_and_file_instead_of_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "missing adapter_config.json")
    (tmp_path / "file").write_text("{}")
    refused(tmp_path / "file", "not a folder")


def test_config_without_weights(llama_adapters, tmp_path):
    folder = copy(llama_adapters[0], tmp_path, "no_weights")
    (folder / WEIGHTS).unlink()
    refused(folder, r"missing adapter_model.safetensors \(or adapter_model.bin\)")


@pytest.mark.parametrize("content,message", [
    (b"", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "adapter_config.json is unreadable"),
    (b"[" * 100_000, "nested too deeply|not valid JSON"),
    (b"{}", "peft_type is None; only LoRA adapters"),
    (b'{"peft_type": "LORA", "r": 4}', "lora_alpha=None; expected a positive number"),
])
def test_malformed_config_files(llama_adapters, tmp_path, content, message):
    folder = copy(llama_adapters[0], tmp_path, "bad")
    (folder / CONFIG).write_bytes(content)
    refused(folder, message)


@pytest.mark.parametrize("fields,message", [
    (dict(lora_alpha=float("nan")), "lora_alpha=nan; expected a positive number"),
    (dict(lora_alpha=float("inf")), "lora_alpha=inf; expected a positive number"),
    (dict(lora_alpha=10**400), r"lora_alpha=1000.*\.\.\.; expected a positive number"),
    (dict(lora_alpha="8"), "lora_alpha='8'; expected a positive number"),
    (dict(r=True), "r=True; expected a positive integer"),
    (dict(r=-4), "r=-4; expected a positive integer"),
    (dict(use_rslora="false"), "use_rslora='false'; expected true or false"),
    (dict(fan_in_fan_out=1), "fan_in_fan_out=1; expected true or false"),
    (dict(rank_pattern=["q_proj"]), r"rank_pattern=\['q_proj'\]; expected an object"),
    (dict(rank_pattern={"q_proj": "4"}), r"rank_pattern\['q_proj'\]='4'; expected a positive integer"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\]=-1; expected a positive number"),
    (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\]=nan"),
    (dict(rank_pattern={"q_proj(": 4}), r"rank_pattern key 'q_proj\(', not a valid pattern"),
    (dict(peft_type=None), "peft_type is None"),
    (dict(task_type="../../task"), "task_type='../../task', which peft does not know"),
    (dict(base_model_name_or_path=["a", "b"]), r"base_model_name_or_path=\['a', 'b'\]; expected a string"),
    (dict(peft_type="LOHA"), "peft_type is 'LOHA'"),
    (dict(modules_to_save=["lm_head\nfake second line"]), r"modules_to_save \(lm_head\\nfake second line\)"),
    # finite, but the squared norm overflows: the Gram matrix then turned every adapter's norm into NaN
    (dict(lora_alpha=1e300), r"module model.layers.0.self_attn.q_proj has an update of norm up to .*e\+29\d \(scale 2.5e\+299\)"),
    (dict(use_bdlora={"nblocks": 2}), "block-diagonal LoRA"),
    (dict(kasa_config={"r": 4}), "KaSA"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication"),
])
def test_config_values_that_would_change_the_numbers_are_refused(llama_adapters, tmp_path, fields, message):
    """Before: NaN/Infinity alpha loaded with scale NaN, a huge integer raised OverflowError, a list
    rank_pattern AttributeError, a bad regex re.error, a string alpha TypeError."""
    refused(set_config(copy(llama_adapters[0], tmp_path, "bad"), **fields), message)


# ---------------------------------------------------------------- bad weights files

def with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-1], "unreadable"),
    (lambda b: b[: 8 + struct.unpack("<Q", b[:8])[0]], "unreadable"),
    (lambda b: b"", "unreadable"),
    (lambda b: b + b"\x00" * 8, "unreadable"),
    (lambda b: struct.pack("<Q", 2**63) + b[8:], "unreadable"),
    (lambda b: with_header({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, b"\x00" * 16), "unreadable"),
    (lambda b: with_header({}, b""), "holds no LoRA weights"),
])
def test_truncated_or_corrupted_safetensors(llama_adapters, tmp_path, damage, message):
    folder = copy(llama_adapters[0], tmp_path, "bad")
    (folder / WEIGHTS).write_bytes(damage((folder / WEIGHTS).read_bytes()))
    refused(folder, message)


@pytest.mark.parametrize("transform,message", [
    # a DoRA magnitude vector in an adapter whose config forgot use_dora: dropping it would change the update
    (lambda s: {**s, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}, "unexpected tensor"),
    (lambda s: {**s, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.ones(32)}, "not named as peft saves it"),
    # key forms peft does not load (the adapter would be a no-op there in peft, not in the merge)
    (lambda s: {k.removeprefix("base_model.model."): v for k, v in s.items()}, r"not named as peft saves it \(base_model\.model\.<module>\.lora_[AB]\.weight\)"),
    (lambda s: {k.removesuffix(".weight"): v for k, v in s.items()}, "not named as peft saves it"),
    (lambda s: {k.replace("lora_A", "lora_embedding_A"): v for k, v in s.items()}, r"lora_embedding_A\)"),
    (lambda s: {k: v.to(torch.int32) for k, v in s.items()}, "non-float factors"),
    (lambda s: {k: v[0].contiguous() if "lora_A" in k else v for k, v in s.items()}, r"factors of shapes \(32,\)"),
])
def test_tensors_that_are_not_plain_lora_factors(llama_adapters, tmp_path, transform, message):
    folder = copy(llama_adapters[0], tmp_path, "bad")
    save_file(transform(load_file(folder / WEIGHTS)), folder / WEIGHTS)
    refused(folder, message)


def test_float8_factors_read_as_peft_loads_them(llama_adapters, tmp_path):
    """peft loads float8 factors into its float32 parameters; so does the reader (torch has little float8 math)."""
    folder = copy(llama_adapters[0], tmp_path, "f8")
    state = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(folder / WEIGHTS).items()}
    save_file(state, folder / WEIGHTS)
    adapter = read_adapter(folder)
    for key, tensor in state.items():
        path, factor = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
        torch.testing.assert_close(getattr(adapter.modules[path], factor[-1]), tensor.float(), rtol=0, atol=0)


def test_factors_the_config_does_not_target_are_refused(llama_adapters, tmp_path):
    """peft wraps only the modules target_modules names and skips other saved factors (checked: its update is
    zero there), so reading them would merge an update the adapter does not make in peft."""
    from peft import PeftModel

    from models import BASES, LLAMA

    folder = set_config(copy(llama_adapters[0], tmp_path, "narrowed"), target_modules=["q_proj"])
    model = PeftModel.from_pretrained(BASES[LLAMA](), folder)
    assert not hasattr(model.base_model.model.model.layers[0].self_attn.v_proj, "lora_A")
    refused(folder, r"factors for model\.layers\.0\.self_attn\.v_proj, which target_modules \(q_proj\) does not name")


def test_old_formats_and_odd_pickles_are_refused_in_one_line(llama_adapters, tmp_path):
    folder = copy(llama_adapters[0], tmp_path, "merged-linear")
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "enable_lora": [False, True, False]}))
    refused(folder, "enable_lora are peft 0.2's MergedLinear format")
    folder = copy(llama_adapters[0], tmp_path, "int-keys")
    (folder / WEIGHTS).unlink()
    torch.save({1: torch.ones(2)}, folder / "adapter_model.bin")
    refused(folder, "adapter_model.bin is not a state dict of tensors")


def test_nan_peft_output_carries_a_checksum_that_catches_any_edit(llama_adapters, tmp_path):
    """A PEFT file has no checksum, so a flipped bit in its data loads as different numbers; what nan-peft
    writes carries one over the tensors and the scale fields of the config."""
    out = merge_adapters(llama_adapters[:2], combine="svd", rank=4).save_pretrained(tmp_path / "out")
    metadata = json.loads((out / WEIGHTS).read_bytes()[8 : 8 + struct.unpack("<Q", (out / WEIGHTS).read_bytes()[:8])[0]])
    assert len(metadata["__metadata__"][CHECKSUM_KEY]) == 64
    original = read_adapter(out)

    flipped = copy(out, tmp_path, "flipped")
    data = bytearray((flipped / WEIGHTS).read_bytes())
    data[-3] ^= 0x01  # a low mantissa bit of the last float: still finite, a different number
    (flipped / WEIGHTS).write_bytes(bytes(data))
    refused(flipped, "do not match the checksum nan-peft wrote")

    r = json.loads((out / CONFIG).read_text())["r"]
    rescaled = set_config(copy(out, tmp_path, "rescaled"), lora_alpha=r + 1)  # a valid config, a different scale
    refused(rescaled, "do not match the checksum")

    # fields outside the update's math may change freely (target_modules may name more modules, not fewer)
    targets = json.loads((out / CONFIG).read_text())["target_modules"]
    renamed = set_config(copy(out, tmp_path, "renamed"), base_model_name_or_path="elsewhere", target_modules=[*targets, "k_proj"])
    assert_same_adapter(read_adapter(renamed), original)


# ---------------------------------------------------------------- merges that must stay exact

def test_fp16_bf16_fp32_inputs_merge_exactly(tmp_path):
    paths = [
        make_adapter(tmp_path / "h", seed=11, magnitude=0.05, dtype=torch.float16),
        make_adapter(tmp_path / "b", seed=12, magnitude=0.2, dtype=torch.bfloat16, r=2, lora_alpha=6),
        make_adapter(tmp_path / "f", seed=13, magnitude=0.1, r=6, lora_alpha=3, target_modules=["q_proj", "k_proj"]),
    ]
    assert [next(iter(read_adapter(p).modules.values())).A.dtype for p in paths] == [torch.float16, torch.bfloat16, torch.float32]
    deltas = peft_deltas(load_sources(LLAMA, paths))  # peft upcasts each adapter into the float32 model
    norms = torch.zeros(3, dtype=torch.float64)
    for per_adapter in deltas.values():
        for name, delta in per_adapter.items():
            norms[int(name[1:])] += delta.square().sum()
    inverse = 1 / norms.sqrt()
    for options in (dict(combine="cat"), dict(combine="svd", rank=12)):
        result = merge_adapters(paths, **options)
        torch.testing.assert_close(result.coefficients.per_adapter, inverse / inverse.sum(), rtol=1e-6, atol=0)
        assert {t.dtype for m in result.adapter.modules.values() for t in (m.A, m.B)} == {torch.float32}
        c = result.coefficients.per_adapter.tolist()
        for path, module in result.adapter.modules.items():
            expected = sum(c[int(n[1:])] * d for n, d in deltas[path].items())
            torch.testing.assert_close(update(module), expected, rtol=1e-5, atol=1e-7)


def test_float16_overflow_is_never_written(tmp_path):
    """Factors beyond 65504 become Inf in float16 (c * s is split between A and B, each about sqrt(c * s) here):
    the merge refuses it, and so does the writer."""
    paths = [make_adapter(tmp_path / n, seed=s, magnitude=1.0, dtype=torch.float16, lora_alpha=2_000_000_000_000) for n, s in (("a", 1), ("b", 2))]
    with pytest.raises(NanPeftError, match=r"the merged factors of model\..* overflow float16; merge with dtype=float32"):
        merge_adapters(paths, combine="cat")
    safe = merge_adapters(paths, combine="cat", dtype=torch.float32)
    assert all(torch.isfinite(m.B).all() for m in safe.adapter.modules.values())
    module = next(iter(safe.adapter.modules.values()))
    broken = LoraAdapter("broken", "", safe.adapter.config, {"model.x": LoraModule(module.A.half(), module.B.half(), 1.0)})
    with pytest.raises(NanPeftError, match=r"cannot write base_model\.model\.model\.x\.lora_[AB]\.weight: it holds NaN or Inf \(float16 overflow\? merge with dtype=float32\)"):
        write_adapter(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
    safe.save_pretrained(tmp_path / "out")


def test_merge_never_returns_non_finite_factors(tmp_path):
    paths = [make_adapter(tmp_path / n, seed=s, magnitude=1.0, dtype=torch.float16, lora_alpha=2_000_000) for n, s in (("a", 1), ("b", 2))]
    try:
        result = merge_adapters(paths, combine="cat")
    except NanPeftError:
        return
    assert all(torch.isfinite(t).all() for m in result.adapter.modules.values() for t in (m.A, m.B))


def test_zero_update_under_uniform_and_module_granularity(llama_adapters, tmp_path):
    zero = make_adapter(tmp_path / "zero", magnitude=0.0)
    plain = read_adapter(llama_adapters[0])
    half = merge_adapters([llama_adapters[0], zero], combine="svd", rank=4, coefficients="uniform")
    for path, module in half.adapter.modules.items():
        torch.testing.assert_close(update(module), 0.5 * update(plain.modules[path]), rtol=1e-5, atol=1e-7)
    # per module, an exactly-zero update counts as absent: the other adapter gets all of the weight
    whole = merge_adapters([llama_adapters[0], zero], granularity="module")
    assert whole.coefficients.values[:, 0].tolist() == [1.0] * len(whole.coefficients.modules)
    assert whole.coefficients.values[:, 1].tolist() == [0.0] * len(whole.coefficients.modules)
    for path, module in whole.adapter.modules.items():
        torch.testing.assert_close(update(module), update(plain.modules[path]), rtol=1e-5, atol=1e-7)


def test_single_adapter_negation_and_exact_svd(llama_adapters):
    source = read_adapter(llama_adapters[1])
    negated = merge_adapters(llama_adapters[1:2], coefficients=[-1.0])
    exact = merge_adapters(llama_adapters[1:2], combine="svd", rank=8)
    assert negated.adapter.modules.keys() == exact.adapter.modules.keys() == source.modules.keys()
    for path, module in source.modules.items():
        torch.testing.assert_close(update(negated.adapter.modules[path]), -update(module), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(update(exact.adapter.modules[path]), update(module), rtol=1e-5, atol=1e-7)
    assert all(r.discarded == pytest.approx(0, abs=1e-6) for r in exact.report)


def test_negative_weights_under_svd_equal_dense_truncation(llama_adapters):
    """Task negation through the truncated path: best rank-3 approximation of dW_0 - 0.7 dW_1."""
    sources = read_adapters(llama_adapters[:2])
    result = merge_adapters(llama_adapters[:2], combine="svd", rank=3, coefficients=[1.0, -0.7])
    for path, module in result.adapter.modules.items():
        dense = sum(w * update(s.modules[path]) for w, s in zip((1.0, -0.7), sources) if path in s.modules)
        U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
        torch.testing.assert_close(update(module), U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], rtol=1e-5, atol=1e-7)


def test_svd_rank_above_the_input_ranks_is_exact_and_padded(llama_adapters):
    sources = read_adapters(llama_adapters[:2])
    result = merge_adapters(llama_adapters[:2], combine="svd", rank=30, coefficients="uniform")
    assert result.rank == 30 and all(m.rank == 30 for m in result.adapter.modules.values())
    for path, module in result.adapter.modules.items():
        dense = sum(0.5 * update(s.modules[path]) for s in sources if path in s.modules)
        torch.testing.assert_close(update(module), dense, rtol=1e-5, atol=1e-8)
    assert max(r.discarded for r in result.report) < 1e-6


@pytest.mark.parametrize("options,message", [
    (dict(combine="svd", rank=-1), "rank must be a positive integer, got -1"),
    (dict(combine="svd", rank=2.5), "rank must be a positive integer, got 2.5"),
    (dict(combine="svd", rank=True), "rank must be a positive integer, got True"),
    (dict(combine="svd", rank="8"), "rank must be a positive integer, got '8'"),
    (dict(combine="cat", rank=0), "rank must be a positive integer, got 0"),
    (dict(coefficients=[1.0, 2.0, 3.0, 4.0], weights=[1.0, 2.0, 3.0, 4.0]), "either as coefficients= or as weights=, not both"),
    (dict(coefficients="manual", weights=[1, 1, 1, 1], granularity="module"), "manual coefficients.* granularity"),
    (dict(coefficients="manual", weights=[1, 1, 1, 1], exponent=2.0), "manual coefficients.* exponent"),
    (dict(coefficients="uniform", weights=[1, 1, 1, 1]), "uniform coefficients.* weights"),
    (dict(coefficients=[1.0, float("inf"), 1.0, 1.0]), "weight must be a finite number, got inf"),
    (dict(coefficients=[1.0, float("nan"), 1.0, 1.0]), "weight must be a finite number, got nan"),
    (dict(coefficients=[1.0, 1.0, 1.0, 1.0, 1.0]), "got 5 weights for 4 adapters"),
    (dict(device="tpu:0"), "unknown device 'tpu:0'"),
])
def test_out_of_range_and_conflicting_options(llama_adapters, options, message):
    with pytest.raises(NanPeftError, match=message) as error:
        merge_adapters(llama_adapters, **options)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------- duplicate inputs

def test_duplicate_inputs_are_refused_naming_both(llama_adapters, tmp_path):
    first = llama_adapters[0]
    message = "inputs 1 ({}) and 2 ({}) are the same adapter, so merging would silently double its weight; pass allow_duplicates=True"
    with pytest.raises(NanPeftError) as error:
        read_adapters([first, first])
    assert str(error.value).startswith(message.format(first, first))
    # a copy in another folder is the same adapter too, and merge_adapters refuses it by default
    twin = copy(first, tmp_path, "twin")
    with pytest.raises(NanPeftError) as error:
        merge_adapters([llama_adapters[1], first, twin])
    assert str(error.value).startswith(f"inputs 2 ({first}) and 3 ({twin}) are the same adapter")
    # the same in-memory adapter twice
    adapter = read_adapter(first)
    with pytest.raises(NanPeftError, match=r"inputs 1 \(.*plain\) and 2 \(.*plain\) are the same adapter"):
        read_adapters([adapter, adapter])


def test_near_duplicates_are_not_duplicates(llama_adapters, tmp_path):
    """Same factors with another alpha, or one changed number: different updates, merged normally."""
    first = llama_adapters[0]
    rescaled = set_config(copy(first, tmp_path, "rescaled"), lora_alpha=16)
    nudged = copy(first, tmp_path, "nudged")
    state = load_file(nudged / WEIGHTS)
    key = sorted(state)[0]
    state[key][0, 0] += 1e-3
    save_file(state, nudged / WEIGHTS)
    assert [a.name for a in read_adapters([first, rescaled, nudged])] == ["plain", "rescaled", "nudged"]


def test_allowed_duplicates_merge_as_asked(llama_adapters):
    """Opted in, the same adapter twice is two equal-norm inputs: NAN gives each 1/2, the merge is the adapter."""
    source = read_adapter(llama_adapters[0])
    result = merge_adapters([llama_adapters[0], llama_adapters[0]], allow_duplicates=True)
    assert result.coefficients.per_adapter.tolist() == [0.5, 0.5]
    assert list(result.norms) == ["plain", "plain#2"]
    for path, module in source.modules.items():
        torch.testing.assert_close(update(result.adapter.modules[path]), update(module), rtol=1e-5, atol=1e-7)


def test_allowed_duplicates_merge_and_leave_callers_objects_alone(llama_adapters):
    adapter = read_adapter(llama_adapters[0])
    merged = read_adapters([adapter, adapter, llama_adapters[0]], allow_duplicates=True)
    assert [a.name for a in merged] == ["plain", "plain#2", "plain#3"]
    assert adapter.name == "plain"  # renaming copies, it does not rename the caller's object
    assert merged[0] is adapter and merged[1] is not adapter and merged[1].modules is adapter.modules


# ---------------------------------------------------------------- no code execution, no writes outside the output

def pickle_bomb(marker: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Payload()}


def test_pickle_payload_is_never_executed(llama_adapters, tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(llama_adapters[0] / CONFIG, folder)
    torch.save(pickle_bomb(marker), folder / "adapter_model.bin")
    refused(folder, "adapter_model.bin is unreadable or not plain tensors")
    assert not marker.exists()
    # next to a safetensors file, the pickle is never even opened
    both = copy(llama_adapters[0], tmp_path, "both")
    torch.save(pickle_bomb(marker), both / "adapter_model.bin")
    assert_same_adapter(read_adapter(both), read_adapter(llama_adapters[0]))
    assert not marker.exists()


def test_pickle_of_plain_values_is_not_an_adapter(llama_adapters, tmp_path):
    folder = tmp_path / "values"
    folder.mkdir()
    shutil.copy(llama_adapters[0] / CONFIG, folder)
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [1.0, 2.0]}, folder / "adapter_model.bin")
    refused(folder, "adapter_model.bin is not a state dict of tensors")


def test_config_strings_never_become_output_paths(llama_adapters, tmp_path):
    """Config fields and tensor names are data: with hostile values, the only files written are the output's."""
    inputs = tmp_path / "deep" / "er" / "inputs"
    hostile = {"base_model_name_or_path": "../../evil", "revision": "/tmp/../evil", "peft_version": "../x"}
    first = set_config(copy(llama_adapters[0], inputs, "first"), **hostile)
    second = set_config(copy(llama_adapters[1], inputs, "second"), **hostile)
    state = load_file(second / WEIGHTS)
    state = {k.replace("model.layers.0.", "model.layers.0.../../"): v for k, v in state.items()}  # a dotted, slashed module path
    save_file(state, second / WEIGHTS)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "deep" / "er" / "out"
    result = merge_adapters([first, second])
    result.save_pretrained(out)
    assert {p for p in tmp_path.rglob("*")} - before == {out, out / CONFIG, out / WEIGHTS}
    config = json.loads((out / CONFIG).read_text())
    assert config["base_model_name_or_path"] == "../../evil"  # kept as data for loaders, never used as a path here
    assert any("../../" in m for m in config["target_modules"])


@pytest.mark.parametrize("name", ["../escape.md", "sub/README.md", "/tmp/abs.md", "..", "", "adapter_config.json", "a\0b"])
def test_extra_file_names_cannot_escape_or_clobber(llama_adapters, tmp_path, name):
    result = merge_adapters(llama_adapters[:1])
    with pytest.raises(NanPeftError, match="must be a plain file name other than adapter_config.json, adapter_model.safetensors"):
        result.save_pretrained(tmp_path / "out" / "merged", extra_files={name: "text"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.md").exists()


def test_merge_output_may_not_replace_an_input(llama_adapters, tmp_path):
    sources = [copy(p, tmp_path, p.name) for p in llama_adapters[:2]]
    digests = [tree_digest(p) for p in sources]
    result = merge_adapters(sources)
    for target in (sources[1], sources[0] / "merged"):
        with pytest.raises(NanPeftError, match="would replace or write into input"):
            result.save_pretrained(target, overwrite=True)
    assert [tree_digest(p) for p in sources] == digests
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patterns", "plain"]


def test_output_may_not_replace_or_enter_an_input(llama_adapters, tmp_path):
    source = copy(llama_adapters[0], tmp_path, "source")
    digest = tree_digest(source)
    adapter = read_adapter(source)
    for target in (source, source / "merged", tmp_path):
        with pytest.raises(NanPeftError, match=f"output folder {target} would replace or write into input {source}"):
            write_adapter(adapter, target, overwrite=True, protected=[adapter.source])
    assert tree_digest(source) == digest


# ---------------------------------------------------------------- nothing lost

def test_inputs_are_never_modified(llama_adapters, tmp_path):
    folders = [copy(p, tmp_path / "inputs", p.name) for p in llama_adapters]
    bin_folder = tmp_path / "inputs" / "bin"
    bin_folder.mkdir()
    shutil.copy(folders[0] / CONFIG, bin_folder)
    torch.save(load_file(folders[0] / WEIGHTS), bin_folder / "adapter_model.bin")
    before = {p: tree_digest(p) for p in (*folders, bin_folder)}
    stamps = {p: p.stat().st_mtime_ns for folder in before for p in folder.rglob("*")}
    merge_adapters(folders, combine="svd", rank=4).save_pretrained(tmp_path / "a")
    merge_adapters([bin_folder, *folders[1:]], coefficients=[1, -1, 2, 0.5]).save_pretrained(tmp_path / "a", overwrite=True)
    with pytest.raises(NanPeftError):
        merge_adapters([folders[0], folders[0]])
    assert {p: tree_digest(p) for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


KILLED_MID_WRITE = """
import sys, threading, time
from pathlib import Path
import nan_peft.writer as writer
from nan_peft import merge_adapters

fresh, existing, ready, *sources = sys.argv[1:]
save_file = writer.save_file

def save_then_hang(state, path, metadata=None):
    save_file(state, path, metadata=metadata)       # the tensors are on disk, the config is not yet
    (Path(ready) / Path(path).parent.name).touch()  # tell the test where we are
    time.sleep(600)

writer.save_file = save_then_hang
result = merge_adapters(sources)
for folder in (fresh, existing):
    threading.Thread(target=result.save_pretrained, args=(folder,), kwargs={"overwrite": True}).start()
"""


def wait_for(condition, process, timeout=180.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"helper exited early: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("helper never reached the point to kill it at")
        time.sleep(0.05)


def test_kill_9_mid_write_leaves_old_output_or_none(llama_adapters, tmp_path):
    fresh, existing, ready = tmp_path / "fresh", tmp_path / "existing", tmp_path / "ready"
    ready.mkdir()
    merge_adapters(llama_adapters[2:]).save_pretrained(existing)
    old = tree_digest(existing)
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(fresh), str(existing), str(ready), *map(str, llama_adapters[:2])],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    wait_for(lambda: len(list(ready.iterdir())) == 2, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL

    assert not fresh.exists()  # never a partial folder under the published name
    assert tree_digest(existing) == old
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert [name.split(".")[1] for name in leftovers] == ["existing", "fresh"]
    assert all(f".{_HOST}-{process.pid}-" in name for name in leftovers)
    assert all(sorted(os.listdir(tmp_path / name)) == [WEIGHTS] for name in leftovers)  # they really were half-written

    # the next publish of each folder completes and sweeps its own dead leftovers
    merged = merge_adapters(llama_adapters[:2])
    merged.save_pretrained(fresh)
    merged.save_pretrained(existing, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "fresh", "ready"]
    assert tree_digest(fresh) == tree_digest(existing) != old
    assert_same_adapter(read_adapter(fresh), merged.adapter)


KILLED_WHILE_SWAPPING = """
import sys
from nan_peft import read_adapter
from nan_peft.writer import write_adapter

out, *sources = sys.argv[1:]
versions = [read_adapter(s) for s in sources]
count = 0
while True:
    write_adapter(versions[count % 2], out, overwrite=True)
    count += 1
    if count == 2:
        print("swapping", flush=True)
"""


def test_kill_9_at_a_random_moment_of_repeated_overwrites(llama_adapters, tmp_path):
    """A server reading `out` after the crash finds one complete version, byte for byte."""
    out = tmp_path / "out"
    versions = [read_adapter(p) for p in llama_adapters[:2]]
    expected = []
    for k, version in enumerate(versions):
        write_adapter(version, tmp_path / f"v{k}")
        expected.append(tree_digest(tmp_path / f"v{k}"))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_WHILE_SWAPPING, str(out), *map(str, llama_adapters[:2])],
        env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline()
    assert line == "swapping\n", process.communicate()
    time.sleep(random.Random(8).uniform(0.05, 0.5))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert tree_digest(out) in expected
    assert_same_adapter(read_adapter(out), read_adapter(tmp_path / f"v{expected.index(tree_digest(out))}"))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.")]) <= 1
    write_adapter(versions[0], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v0", "v1"]


def test_readers_see_one_complete_version_during_overwrites(llama_adapters, tmp_path):
    """What a hot-swapping server sees while we publish: always a complete adapter, never a mix."""
    out = tmp_path / "out"
    versions = [read_adapter(p) for p in llama_adapters[:2]]
    write_adapter(versions[0], out)
    done = threading.Event()

    def publish():
        for k in range(30):
            write_adapter(versions[k % 2], out, overwrite=True)
        done.set()

    writer = threading.Thread(target=publish)
    writer.start()
    written = [read_adapter(out)]
    write_adapter(versions[1], tmp_path / "v1")
    written.append(read_adapter(tmp_path / "v1"))
    loads = [0, 0]
    while not done.is_set():
        try:
            adapter = read_adapter(out)  # a swap between reading the config and the weights makes it read again
        except NanPeftError as error:  # three swaps in a row during one read: refused, still never a mix
            assert "kept changing while it was being read" in str(error)
            continue
        match = [k for k, w in enumerate(written) if adapter.modules.keys() == w.modules.keys()]
        assert len(match) == 1
        assert_same_adapter(adapter, written[match[0]])
        loads[match[0]] += 1
    writer.join()
    assert sum(loads) > 0


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_stale_temporaries_are_removed_only_when_their_writer_is_gone(tmp_path):
    folder = tmp_path / "out"
    dead, sleeper = dead_pid(), subprocess.Popen(["sleep", "60"])
    try:
        names = {
            "dead": f".out.{_HOST}-{dead}-abc.tmp",
            "alive": f".out.{_HOST}-{sleeper.pid}-abc.tmp",
            "other_host": f".out.{'0' * 8 if _HOST != '0' * 8 else '1' * 8}-{dead}-abc.tmp",
            "other_folder": f".out2.{_HOST}-{dead}-abc.tmp",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "partial").write_text("x")
        assert remove_stale_temporaries(folder) == [tmp_path / names["dead"]]
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names["alive"], names["other_host"], names["other_folder"]}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_old_contents_moved_aside_by_a_killed_swap_are_put_back(tmp_path):
    """Non-Linux fallback killed between 'move old aside' and 'move new in': the old output returns."""
    aside = tmp_path / f".out.{_HOST}-{dead_pid()}-abc.tmp.old"
    aside.mkdir()
    (aside / "adapter_config.json").write_text("old")
    half_new = tmp_path / aside.name.removesuffix(".old")
    half_new.mkdir()
    with pytest.raises(NanPeftError, match="already exists"):
        publish_folder(tmp_path / "out", lambda tmp: (tmp / "adapter_config.json").write_text("new"))
    assert (tmp_path / "out" / "adapter_config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- determinism

REPEAT_IN_ANOTHER_PROCESS = """
import json, sys, torch
torch.set_num_threads(1)
from nan_peft import merge_adapters
out, runs, *sources = sys.argv[1:]
for name, options in json.loads(runs).items():
    merge_adapters(sources, **options).save_pretrained(f"{out}/{name}")
"""

RUNS = {
    "nan_cat": {},
    "module_svd": {"combine": "svd", "rank": 6, "granularity": "module", "exponent": 2.0},
    "negation": {"coefficients": [1.0, -0.5, 0.25, 2.0], "combine": "svd", "rank": 5},
}


def test_byte_identical_across_processes_hash_seeds_and_threads(llama_adapters, tmp_path):
    there = subprocess.run(
        [sys.executable, "-c", REPEAT_IN_ANOTHER_PROCESS, str(tmp_path / "there"), json.dumps(RUNS), *map(str, llama_adapters)],
        env=subprocess_env(PYTHONHASHSEED="12345"), capture_output=True, text=True, timeout=300,
    )
    assert there.returncode == 0, there.stderr[-2000:]
    for name, options in RUNS.items():
        merge_adapters(llama_adapters, **options).save_pretrained(tmp_path / "here" / name)
        assert tree_digest(tmp_path / "here" / name) == tree_digest(tmp_path / "there" / name), name


def test_gram_refuses_non_finite_updates():
    """In-memory adapters skip the reader's checks: update_gram names the culprit instead of NaN norms."""
    good = LoraModule(torch.ones(2, 3), torch.ones(4, 2), 1.0)
    huge = LoraModule(torch.full((2, 3), 1e200, dtype=torch.float64), torch.full((4, 2), 1e200, dtype=torch.float64), 1.0)
    adapters = [LoraAdapter("good", "", {}, {"m": good}), LoraAdapter("huge", "", {}, {"m": huge})]
    with pytest.raises(NanPeftError, match="the update of huge at m has a non-finite norm"):
        update_gram(adapters)


def test_rank_beyond_any_module_is_refused(llama_adapters):
    with pytest.raises(NanPeftError, match=r"rank 10000 is out of range: no merged module can have a rank above 32, and padding stops at 1024"):
        merge_adapters(llama_adapters, combine="svd", rank=10_000)
