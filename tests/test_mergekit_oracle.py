"""mergekit (0.1.5) as a peer oracle: the same tiny fine-tunes merged by mergekit's task_arithmetic and ties (its
Python API, run_merge) and by nan-peft's full-checkpoint merge, with the same weights, give the same tensors up to
float32 rounding. One stated difference, tested: mergekit's magnitude trim keeps at least one entry of a tensor
(mergekit/sparsify.py, magnitude: k = max(1, int(density * numel))); nan-peft keeps int(density * numel), as
TIES's paper and peft do, so a tensor with density * numel < 1 keeps nothing of its task vector."""

import pytest
import torch

from models import tiny_gpt2, tiny_llama
from nan_peft.full import merge_checkpoints
from nan_peft.spec import MergeSpec
from test_full_checkpoints import fine_tune, tensors

pytest.importorskip("mergekit")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergekit")
    made = {}
    for arch, builder in BUILDERS.items():
        builder().save_pretrained(root / arch / "base", max_shard_size="40KB")
        made[arch] = (root / arch / "base", [fine_tune(builder, root / arch / f"ft{k}", seed=10 + k, norm=1.0 + k) for k in range(3)])
    return made


def mergekit_merge(method, base, fts, weights, output, density=None):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    parameters = [{"weight": float(w), **({"density": density} if density is not None else {})} for w in weights]
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(ft), "parameters": p} for ft, p in zip(fts, parameters)]}
    run_merge(MergeConfiguration.model_validate(config), str(output), MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    return tensors(output)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method,density", [("task_arithmetic", None), ("ties", 0.4)])
@pytest.mark.parametrize("coefficients", ["manual", "nan"])
def test_same_tensors_as_mergekit(checkpoints, tmp_path, arch, method, density, coefficients):
    base, fts = checkpoints[arch]
    spec = MergeSpec(method=method, density=density, weights=(0.5, 0.3, 0.2) if coefficients == "manual" else None)
    done = merge_checkpoints(base, fts, tmp_path / "nan-peft", spec)
    weights = done.coefficients.per_adapter.tolist()  # NAN's coefficients handed to mergekit as its weights
    theirs = mergekit_merge(method, base, fts, weights, tmp_path / "mergekit", density)
    ours = tensors(tmp_path / "nan-peft")
    assert set(theirs) <= set(ours) and set(ours) - set(theirs) <= {"lm_head.weight"}  # GPT-2's tied head: not stored
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=5e-7, rtol=0), (name, float((ours[name] - tensor).abs().max()))


def test_stated_difference_minimum_one_entry(checkpoints, tmp_path):
    """density 0.02: every 32-entry norm weight of tiny Llama (0.64 entries) keeps nothing in nan-peft, one entry
    per input in mergekit; every larger tensor agrees."""
    base, fts = checkpoints["llama"]
    merge_checkpoints(base, fts, tmp_path / "nan-peft", MergeSpec(method="ties", density=0.02, weights=(0.5, 0.3, 0.2)))
    theirs = mergekit_merge("ties", base, fts, (0.5, 0.3, 0.2), tmp_path / "mergekit", 0.02)
    ours, w0 = tensors(tmp_path / "nan-peft"), tensors(base)
    for name, tensor in theirs.items():
        if 0.02 * tensor.numel() < 1:
            assert torch.equal(ours[name], w0[name]) and (tensor != w0[name]).sum() in (1, 2, 3), name
        else:
            assert torch.allclose(ours[name], tensor, atol=5e-7, rtol=0), name
