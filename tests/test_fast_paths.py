"""The fast paths against the plain ones they replace: Grams summed over cache-sized pieces, the Cholesky-QR
truncation (with its QR fallback on ill-conditioned stacks), cat written straight into the output, and the
fold's row-block addmm. Each must give what the plain computation gives."""

import pytest
import torch

import nan_peft.batching as batching
import nan_peft.fold as fold
from nan_peft import merge_adapters, update_gram
from nan_peft.combination import _cat_factors, stacked_factors, weighted_terms
from nan_peft.gram import pad_rank, truncate_low_rank, truncation_from_grams
from nan_peft.lora import LoraAdapter, LoraModule


def adapter(name, shapes, r, seed, b_spectrum=None):
    """{path: (out, in)} -> a LoraAdapter with Gaussian factors; b_spectrum gives B these singular values."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, (out, fan_in) in shapes.items():
        A = torch.randn(r, fan_in, generator=g, dtype=torch.float64) / fan_in**0.5
        B = torch.randn(out, r, generator=g, dtype=torch.float64)
        if b_spectrum is not None:
            U, _, Vh = torch.linalg.svd(B, full_matrices=False)
            B = U @ torch.diag(torch.tensor(b_spectrum, dtype=torch.float64)) @ Vh
        modules[path] = LoraModule(A, B, 2.0)
    return LoraAdapter(name, "", {}, modules)


SHAPES = {"q": (40, 24), "down": (24, 56), "wide": (16, 300)}


def dense_truncation(adapters, weights, path, rank):
    dense = sum(w * a.modules[path].delta() for w, a in zip(weights, adapters) if path in a.modules)
    U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
    return U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank], S


def merged_delta(result, path):
    module = result.adapter.modules[path]
    return module.scale * (module.B.double() @ module.A.double())


@pytest.mark.parametrize("R,m,n,rank", [(12, 40, 50, 5), (12, 40, 50, 20), (30, 200, 64, 8), (8, 8, 300, 3)])
def test_truncation_from_grams_equals_qr_truncation(R, m, n, rank):
    g = torch.Generator().manual_seed(R + m)
    A = torch.randn(3, R, n, generator=g, dtype=torch.float64)
    B = torch.randn(3, m, R, generator=g, dtype=torch.float64) * torch.logspace(0, -3, R, dtype=torch.float64)
    Pb, Pa, S, ok = truncation_from_grams(A @ A.mT, B.mT @ B, rank)
    assert ok.all()
    B_qr, A_qr, S_qr = truncate_low_rank(B, A, rank)
    B_r, A_r = pad_rank(B @ Pb, Pa @ A, rank)
    torch.testing.assert_close(B_r @ A_r, B_qr @ A_qr, rtol=0, atol=1e-10 * float(S_qr.amax()))
    torch.testing.assert_close(S[..., : S_qr.shape[-1]], S_qr, rtol=1e-10, atol=1e-12)


def test_truncation_from_grams_refuses_singular_and_ill_conditioned_grams():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(4, 30, generator=g, dtype=torch.float64), torch.randn(20, 4, generator=g, dtype=torch.float64)
    same_twice = (torch.cat([A1, A1]), torch.cat([B1, 2 * B1], 1))
    too_wide = (torch.randn(12, 10, generator=g, dtype=torch.float64), torch.randn(20, 12, generator=g, dtype=torch.float64))
    zero_row = (torch.cat([A1, torch.zeros(1, 30, dtype=torch.float64)]), torch.randn(20, 5, generator=g, dtype=torch.float64))
    U, _, Vh = torch.linalg.svd(B1, full_matrices=False)  # singular values down to 1e-9 (not a column scaling,
    ill = (A1, U @ torch.diag(torch.tensor([1.0, 1e-2, 1e-5, 1e-9], dtype=torch.float64)) @ Vh)  # which is undone)
    for A, B in (same_twice, too_wide, zero_row, ill):
        assert not truncation_from_grams(A @ A.mT, B.mT @ B, 3)[3].item()


@pytest.mark.parametrize("case", ["well-conditioned", "same adapter twice", "ill-conditioned B", "rank above R"])
def test_svd_merge_is_the_optimal_truncation_whichever_path(case):
    """Through merge_adapters: the Gram path where it is accurate, QR where it is not; either way the dense optimum."""
    adapters = [adapter("a", SHAPES, 4, 1), adapter("b", SHAPES, 3, 2)]
    rank = 5
    if case == "same adapter twice":
        adapters = [adapters[0], adapter("a2", SHAPES, 4, 1)]
    elif case == "ill-conditioned B":
        adapters[1] = adapter("b", SHAPES, 3, 2, b_spectrum=[1.0, 1e-6, 1e-11])
    elif case == "rank above R":
        rank = 9
    weights = [0.7, -0.4]
    result = merge_adapters(adapters, combine="svd", rank=rank, coefficients=weights, dtype=torch.float64, allow_duplicates=True)
    report = {r.module: r for r in result.report}
    for path in SHAPES:
        best, S = dense_truncation(adapters, weights, path, rank)
        scale = float(S[0])
        torch.testing.assert_close(merged_delta(result, path), best, rtol=0, atol=1e-9 * scale)
        assert report[path].discarded == pytest.approx(float(S[rank:].square().sum().sqrt()), rel=1e-6, abs=1e-9 * scale)
        assert report[path].norm == pytest.approx(float(S.square().sum().sqrt()), rel=1e-9)


def test_update_gram_is_the_same_over_small_pieces(monkeypatch):
    """Grams summed over many pieces (a piece smaller than one module) equal the one-piece Grams and dense."""
    adapters = [adapter("a", SHAPES, 4, 1), adapter("b", SHAPES, 3, 2), adapter("c", {"q": (40, 24)}, 2, 3)]
    whole = update_gram(adapters).inner
    monkeypatch.setattr(batching, "CPU_CHUNK_BYTES", 7 * 8 * 64)  # 64 columns of a rank-7 stack at a time
    pieces = update_gram(adapters).inner
    torch.testing.assert_close(pieces, whole, rtol=1e-13, atol=1e-13)
    for m, path in enumerate(sorted(SHAPES)):
        deltas = [a.modules[path].delta() if path in a.modules else None for a in adapters]
        for i, di in enumerate(deltas):
            for j, dj in enumerate(deltas):
                expected = 0.0 if di is None or dj is None else float((di * dj).sum())
                assert float(whole[m, i, j]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cat_factors_equal_the_stacked_cast(dtype):
    adapters = [adapter("a", SHAPES, 4, 1), adapter("b", SHAPES, 3, 2)]
    for a in adapters:
        for path, m in a.modules.items():
            a.modules[path] = LoraModule(m.A.float(), m.B.float(), m.scale)
    result = merge_adapters(adapters, coefficients=[0.3, 0.9])
    terms = weighted_terms(adapters, result.coefficients)
    buffer = torch.empty(50, dtype=torch.float64)  # forces several pieces of B
    for path, path_terms in terms.items():
        B, A = pad_rank(*stacked_factors(path_terms), 9)
        B_fast, A_fast = _cat_factors(path_terms, 9, dtype, buffer)
        assert torch.equal(B_fast, B.to(dtype)) and torch.equal(A_fast, A.to(dtype))


@pytest.mark.parametrize("chunk", [64, 4096])
def test_fold_rows_in_blocks_equal_the_whole_update(monkeypatch, tmp_path, chunk):
    """The row-block addmm of the streaming fold, with blocks of a few rows (and rows longer than a block),
    equals (W.float() + update.float()).to(W.dtype) with the update formed whole."""
    from safetensors.torch import save_file

    from nan_peft.fold import read_header
    from nan_peft.fold.stream import _Buffers, _write_folded_rows, row_factors

    monkeypatch.setattr(fold.stream, "FOLD_CHUNK_BYTES", chunk)
    adapters = [adapter("a", SHAPES, 4, 1), adapter("b", SHAPES, 3, 2)]
    for a in adapters:
        for path, m in list(a.modules.items()):
            a.modules[path] = LoraModule(m.A.float(), m.B.float(), m.scale, fan_in_fan_out=path == "down")
    result = merge_adapters(adapters, coefficients=[0.6, 0.5])
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        weights = {}
        for path, (out, fan_in) in SHAPES.items():
            shape = (fan_in, out) if path == "down" else (out, fan_in)
            weights[path] = torch.randn(*shape, generator=g).to(dtype)
        source = tmp_path / f"w-{dtype}.safetensors"
        save_file(weights, source)
        _, entries = read_header(source)
        target = tmp_path / f"out-{dtype}.bin"
        buffers = _Buffers("cpu")
        with open(source, "rb") as src, open(target, "wb") as out:
            for path in SHAPES:
                factors = row_factors(result, path, adapters[0].modules[path], {}, "cpu")
                _write_folded_rows(src.fileno(), out.fileno(), entries[path], factors, buffers, source)
        raw = target.read_bytes()
        offset = 0
        for path, weight in weights.items():
            size = weight.numel() * weight.element_size()
            folded = torch.frombuffer(bytearray(raw[offset : offset + size]), dtype=dtype).reshape(weight.shape)
            offset += size
            update = sum(c * a.modules[path].delta() for c, a in zip([0.6, 0.5], adapters)).float()
            expected = (weight.float() + (update.T if path == "down" else update)).to(dtype)
            torch.testing.assert_close(folded, expected, rtol=1e-5, atol=1e-6, msg=f"{path} {dtype}")
