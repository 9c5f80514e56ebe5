"""Property-based tests (hypothesis) of the core identities and of the reader (issue 8).

Over random shapes, ranks, scales, magnitudes and weights (negative and zero included), against dense
float64 references computed here: the Gram norms equal the dense norms, "cat" equals the dense weighted
sum, "svd" is the optimal (Eckart-Young) truncation; and every adapter the reader accepts carries exactly
the numbers that were saved, damaged or not.

Runs are deterministic (derandomize) with modest example counts; for a longer random search:
    NAN_PEFT_PROPERTY_EXAMPLES=2000 pytest tests/test_properties.py
"""

import json
import math
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from nan_peft import LoraAdapter, LoraModule, NanPeftError, merge_adapters, read_adapter, update_gram, write_adapter

EXPLORE = int(os.environ.get("NAN_PEFT_PROPERTY_EXAMPLES", "0"))


def examples(n: int) -> settings:
    return settings(
        max_examples=EXPLORE or n,
        derandomize=not EXPLORE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- random adapters in memory

@st.composite
def adapter_sets(draw, max_adapters=4, max_modules=3, max_dim=9, max_rank=5):
    """1-4 adapters over up to 3 module paths of random (out, in) shapes; each adapter adapts a random
    non-empty subset with its own rank, scale and magnitude. Factors are float64 so that identities are
    checked to ~1e-9, not to float32 rounding. Some B are zero (LoRA's initialisation)."""
    shapes = draw(st.lists(st.tuples(st.integers(1, max_dim), st.integers(1, max_dim)), min_size=1, max_size=max_modules))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    adapters = []
    for k in range(draw(st.integers(1, max_adapters))):
        present = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
        present[draw(st.integers(0, len(shapes) - 1))] = True  # every adapter adapts something
        magnitude = draw(st.sampled_from([1e-4, 0.1, 1.0, 30.0]))
        modules = {}
        for m, ((out, fan_in), here) in enumerate(zip(shapes, present)):
            if not here:
                continue
            r = draw(st.integers(1, max_rank))
            scale = draw(st.floats(1e-2, 1e2))
            A = torch.randn(r, fan_in, generator=generator, dtype=torch.float64) * magnitude
            B = torch.randn(out, r, generator=generator, dtype=torch.float64)
            if draw(st.integers(0, 9)) == 0:
                B = torch.zeros_like(B)
            modules[f"model.layers.{m}.proj"] = LoraModule(A, B, scale)
        adapters.append(LoraAdapter(name=f"a{k}", source="", config={}, modules=modules))
    return adapters


def dense(module: LoraModule) -> torch.Tensor:
    return module.scale * (module.B.double() @ module.A.double())


def weighted_sum(adapters, weights, path):
    terms = [w * dense(a.modules[path]) for a, w in zip(adapters, weights) if path in a.modules]
    return sum(terms[1:], terms[0])


def weight_lists(size):
    return st.lists(st.sampled_from([-2.0, -1.0, -0.3, 0.0, 0.25, 0.5, 1.0, 3.0]), min_size=size, max_size=size)


@examples(60)
@given(adapter_sets())
def test_gram_inner_products_equal_dense(adapters):
    gram = update_gram(adapters)
    assert gram.modules == tuple(sorted({p for a in adapters for p in a.modules}))
    squares = torch.zeros(len(adapters), dtype=torch.float64)
    for m, path in enumerate(gram.modules):
        deltas = [dense(a.modules[path]) if path in a.modules else None for a in adapters]
        for i, di in enumerate(deltas):
            assert bool(gram.present[m, i]) == (di is not None)
            for j, dj in enumerate(deltas):
                expected = float((di * dj).sum()) if di is not None and dj is not None else 0.0
                bound = 1e-9 * (float(di.norm()) * float(dj.norm()) if di is not None and dj is not None else 0.0)
                assert abs(gram.inner[m, i, j].item() - expected) <= bound + 1e-300, (path, i, j)
            if di is not None:
                squares[i] += di.square().sum()
                assert gram.module_norms[m, i].item() == pytest.approx(float(di.norm()), rel=1e-9, abs=1e-300)
    torch.testing.assert_close(gram.adapter_norms, squares.sqrt(), rtol=1e-9, atol=0)


@examples(50)
@given(adapter_sets(), st.data())
def test_cat_equals_dense_weighted_sum(adapters, data):
    weights = data.draw(weight_lists(len(adapters)))
    contributing = {p for a, w in zip(adapters, weights) if w for p in a.modules}
    assume(contributing)
    result = merge_adapters(adapters, combine="cat", coefficients=weights, dtype=torch.float64)
    assert set(result.adapter.modules) == contributing  # modules whose every weight is 0 are left out
    for path, module in result.adapter.modules.items():
        expected = weighted_sum(adapters, weights, path)
        assert module.scale == 1.0
        torch.testing.assert_close(dense(module), expected, rtol=1e-10, atol=1e-12 * (1 + float(expected.abs().max())))
        needed = sum(a.modules[path].rank for a, w in zip(adapters, weights) if w and path in a.modules)
        assert module.rank == result.rank >= needed


@examples(50)
@given(adapter_sets(max_rank=4), st.data())
def test_svd_is_the_optimal_truncation(adapters, data):
    weights = data.draw(weight_lists(len(adapters)))
    assume(any(weights))
    rank = data.draw(st.integers(1, 12))
    result = merge_adapters(adapters, combine="svd", rank=rank, coefficients=weights, dtype=torch.float64)
    report = {r.module: r for r in result.report}
    for path, module in result.adapter.modules.items():
        exact = weighted_sum(adapters, weights, path)
        S = torch.linalg.svdvals(exact)
        scale = 1 + float(S[0]) if len(S) else 1.0
        truncated = dense(module)
        assert module.rank == rank
        assert torch.linalg.matrix_rank(truncated, atol=1e-9 * scale).item() <= rank
        # Eckart-Young: no rank-`rank` matrix is closer than the tail of the singular values
        optimum = float(S[rank:].square().sum().sqrt())
        assert float((exact - truncated).norm()) == pytest.approx(optimum, rel=1e-6, abs=1e-9 * scale)
        assert report[path].discarded == pytest.approx(optimum, rel=1e-6, abs=1e-9 * scale)
        assert report[path].norm == pytest.approx(float(exact.norm()), rel=1e-9, abs=1e-12 * scale)
        # where the truncation is unique (a gap after the kept values), it is the dense SVD's own
        if rank < len(S) and S[rank - 1] - S[rank] > 1e-6 * scale:
            U, _, Vh = torch.linalg.svd(exact, full_matrices=False)
            best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
            torch.testing.assert_close(truncated, best, rtol=0, atol=1e-6 * scale)


# ---------------------------------------------------------------- the reader

DIMS = {"q_proj": (8, 8), "v_proj": (4, 8), "down_proj": (8, 12)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@st.composite
def peft_folders(draw):
    """A PEFT-format adapter (config + safetensors, as peft saves them) with random r, alpha, rsLoRA,
    rank/alpha patterns, dtype and module set. Returns (config, tensors) to be written to a folder."""
    r = draw(st.integers(1, 6))
    targets = draw(st.lists(st.sampled_from(sorted(DIMS)), min_size=1, max_size=3, unique=True))
    layers = draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
    rank_pattern = draw(st.dictionaries(st.sampled_from([*targets, "layers.1.self_attn.q_proj"]), st.integers(1, 6), max_size=2))
    alpha_pattern = draw(st.dictionaries(st.sampled_from([*targets, r"layers\.0\..*"]), st.sampled_from([1, 2.5, 16, 64]), max_size=2))
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": draw(st.sampled_from([1, 4, 8, 16.0, 0.5])),
        "use_rslora": draw(st.booleans()), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": targets, "bias": "none", "base_model_name_or_path": "tiny",
    }
    dtype = draw(st.sampled_from(DTYPES))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    tensors = {}
    for layer in layers:
        for target in targets:
            section = "mlp" if target == "down_proj" else "self_attn"
            path = f"model.layers.{layer}.{section}.{target}"
            rank = rank_pattern.get(get_pattern_key(list(rank_pattern), path), r)
            out, fan_in = DIMS[target]
            tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator).to(dtype)
            tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(out, rank, generator=generator).to(dtype)
    return config, tensors


def expected_modules(config, tensors):
    """{path: (A, B, scale)} by peft's rules, from what was saved."""
    modules = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        path = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank_pattern, alpha_pattern = config["rank_pattern"], config["alpha_pattern"]
        r = rank_pattern.get(get_pattern_key(list(rank_pattern), path), config["r"])
        alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), path), config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        modules[path] = (A, tensors[key.replace("lora_A", "lora_B")], scale)
    return modules


def save_peft(folder: Path, config, tensors):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def assert_exact(adapter, modules):
    assert adapter.modules.keys() == modules.keys()
    for path, (A, B, scale) in modules.items():
        loaded = adapter.modules[path]
        assert loaded.A.dtype == A.dtype and torch.equal(loaded.A, A) and torch.equal(loaded.B, B), path
        assert loaded.scale == scale, path


@examples(60)
@given(peft_folders())
def test_reader_loads_what_was_saved_exactly(saved):
    config, tensors = saved
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(Path(tmp) / "adapter", config, tensors)
        assert_exact(read_adapter(Path(tmp) / "adapter"), expected_modules(config, tensors))


def damage(data: bytes, where: float, op: str, value: int) -> bytes:
    d = bytearray(data)
    k = min(int(where * len(d)), len(d) - 1)
    if op == "flip":
        d[k] ^= 1 << (value % 8)
    elif op == "set":
        d[k] = value % 256
    elif op == "truncate":
        del d[k:]
    else:  # insert
        d[k:k] = bytes([value % 256])
    return bytes(d)


corruptions = st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from(["flip", "set", "truncate", "insert"]), st.integers(0, 255))


@examples(60)
@given(peft_folders(), corruptions)
def test_damaged_peft_header_loads_exactly_or_is_refused(saved, corruption):
    """Without a checksum, damage to the header or the length (not to the tensor data) must be caught."""
    config, tensors = saved
    where, op, value = corruption
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        save_peft(folder, config, tensors)
        data = (folder / "adapter_model.safetensors").read_bytes()
        header = 8 + int.from_bytes(data[:8], "little")
        position = where * header / len(data) if op in ("flip", "set") else where  # in-place damage: header only
        (folder / "adapter_model.safetensors").write_bytes(damage(data, position, op, value))
        try:
            adapter = read_adapter(folder)
        except NanPeftError as error:
            assert "\n" not in str(error) and str(folder) in str(error)
            return
        assert_exact(adapter, expected_modules(config, tensors))


@examples(60)
@given(peft_folders(), corruptions, st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
def test_damaged_nan_peft_output_loads_exactly_or_is_refused(saved, corruption, target):
    """What nan-peft writes is checksummed: damage anywhere in it is refused or changes nothing."""
    config, tensors = saved
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(Path(tmp) / "source", config, tensors)
        folder = write_adapter(read_adapter(Path(tmp) / "source"), Path(tmp) / "written")
        original = read_adapter(folder)
        data = (folder / target).read_bytes()
        (folder / target).write_bytes(damage(data, *corruption))
        try:
            adapter = read_adapter(folder)
        except NanPeftError as error:
            assert "\n" not in str(error) and str(folder) in str(error)
            return
        assert_exact(adapter, {p: (m.A, m.B, m.scale) for p, m in original.modules.items()})


@examples(40)
@given(peft_folders(), st.integers(0, 3))
def test_written_adapter_reads_back_as_the_same_update(saved, extra_rank):
    """write_adapter bakes scales into B and pads to one rank; the update read back is the same."""
    config, tensors = saved
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(Path(tmp) / "source", config, tensors)
        source = read_adapter(Path(tmp) / "source")
        rank = max(source.ranks) + extra_rank
        back = read_adapter(write_adapter(source, Path(tmp) / "written", rank=rank))
        assert back.modules.keys() == source.modules.keys() and back.ranks == {rank}
        for path, module in source.modules.items():
            tolerance = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[module.B.dtype]
            expected = dense(module)
            torch.testing.assert_close(dense(back.modules[path]), expected, rtol=tolerance, atol=tolerance * float(expected.abs().max()))
