"""The accelerator paths give the CPU's results: norms, every merge rule, the written adapter, the fold (streamed
and placed by accelerate), live merging, the command line, full fine-tunes merged and LoRA extracted from them, each run on the device and compared with the same
call on the CPU (itself proven against dense references and peft in the other test files).

The device under test is NAN_PEFT_TEST_DEVICE (default cuda); the tests are skipped where it is absent. Set it to
cpu to run them here: they then check the comparison logic, not a device.
"""

import os

import pytest
import torch
from peft import PeftModel

from models import BASES, LLAMA, fine_tune, input_ids, tiny_llama
from nan_peft import merge_adapters, update_gram
from nan_peft.cli import cli
from nan_peft.extract import extract_lora
from nan_peft.full import merge_checkpoints
from nan_peft.fold import fold_into
from nan_peft.live import add_nan_weighted_adapter
from nan_peft.spec import ExtractSpec, MergeSpec
from oracle import load_sources

DEVICE = os.environ.get("NAN_PEFT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason=f"no {DEVICE} device (NAN_PEFT_TEST_DEVICE)"
)

RULES = {
    "cat": dict(combine="cat"),
    "svd": dict(combine="svd", rank=4, granularity="module"),
    # the randomized truncation, from the Grams (modules with R <= (m + n) / 4) and on the factors (the rest)
    "svd_randomized": dict(combine="svd", rank=2, truncation="randomized", oversample=0, power_iterations=1),
    "ties": dict(method="ties", density=0.5, combine="svd", rank=16),
    "dare_ties": dict(method="dare_ties", density=0.5, seed=3, rank=16),
    "magnitude_prune": dict(method="magnitude_prune", density=0.3, coefficients="uniform", rank=16),
    # the core path: KnOTS's SVD from the Gram, its trim (k-th magnitude from topk off the CPU, numpy on it), DARE's masks
    "knots_ties": dict(method="knots_ties", density=0.5),
    "knots_dare": dict(method="knots_dare", density=0.5, seed=1),
}


def updates(result) -> dict[str, torch.Tensor]:
    """{module: s B A} of the merged adapter, in float64 on the CPU."""
    return {p: m.scale * (m.B.double().cpu() @ m.A.double().cpu()) for p, m in result.adapter.modules.items()}


def assert_same_updates(ours: dict, reference: dict, rtol: float) -> None:
    assert ours.keys() == reference.keys()
    for path, update in reference.items():
        error = (ours[path] - update).norm() / update.norm().clamp_min(1e-300)
        assert error < rtol, (path, float(error))


def test_update_gram(llama_adapters, gpt2_adapters):
    for adapters in (llama_adapters, gpt2_adapters):
        sources = merge_adapters(adapters).sources
        on_device, on_cpu = update_gram(sources, DEVICE), update_gram(sources, "cpu")
        assert on_device.inner.device.type == "cpu" and on_device.modules == on_cpu.modules
        torch.testing.assert_close(on_device.inner, on_cpu.inner, rtol=1e-12, atol=1e-14 * float(on_cpu.inner.abs().max()))


@pytest.mark.parametrize("rule", RULES)
def test_merge_rules(llama_adapters, tmp_path, rule):
    on_device = merge_adapters(llama_adapters, device=DEVICE, **RULES[rule])
    on_cpu = merge_adapters(llama_adapters, device="cpu", **RULES[rule])
    torch.testing.assert_close(on_device.coefficients.values, on_cpu.coefficients.values, rtol=1e-12, atol=0)
    assert all(t.device.type == "cpu" for m in on_device.adapter.modules.values() for t in (m.A, m.B))
    assert_same_updates(updates(on_device), updates(on_cpu), rtol=1e-5)

    on_device.save_pretrained(tmp_path / "device")
    on_cpu.save_pretrained(tmp_path / "cpu")
    with torch.no_grad():
        ours = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "device")(input_ids()).logits
        reference = PeftModel.from_pretrained(BASES[LLAMA](), tmp_path / "cpu")(input_ids()).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base") / "llama"
    tiny_llama().save_pretrained(folder, max_shard_size="40KB")
    return folder


def folded(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.parametrize("rule", ["cat", "ties"])
def test_fold_streamed_and_placed(llama_adapters, base, tmp_path, rule):
    result = merge_adapters(llama_adapters, **RULES[rule])
    reference = folded(fold_into(result, base, tmp_path / "cpu"))
    streamed = folded(fold_into(result, base, tmp_path / "streamed", device=DEVICE))
    placed = folded(fold_into(result, base, tmp_path / "placed", device_map={"": DEVICE}))
    for out in (streamed, placed):
        assert out.keys() == reference.keys()
        for name, weight in reference.items():
            torch.testing.assert_close(out[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_live_merge_on_a_model_on_the_device(llama_adapters):
    model = load_sources(LLAMA, llama_adapters).to(DEVICE)
    result = add_nan_weighted_adapter(model, ["s0", "s1", "s2", "s3"], "merged", combine="svd", rank=6)
    placed = {p.device.type for name, p in model.named_parameters() if ".merged." in name}
    assert placed == {torch.device(DEVICE).type}
    reference = merge_adapters(llama_adapters, combine="svd", rank=6)
    assert_same_updates(updates(result), updates(reference), rtol=1e-5)
    model.set_adapter("merged")
    with torch.no_grad():
        logits = model(input_ids().to(DEVICE)).logits.cpu()
    model.to("cpu")
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids()).logits, rtol=1e-4, atol=1e-5)


def test_command_line_device(llama_adapters, base, tmp_path):
    from click.testing import CliRunner

    def merge(device: str, *extra: str):
        out = tmp_path / f"{device.replace(':', '-')}-{len(extra)}-{len(list(tmp_path.iterdir()))}"
        args = ["merge", *map(str, llama_adapters), "-o", str(out), "--combine", "svd", "--rank", "8", "--device", device, "--quiet", *extra]
        run = CliRunner().invoke(cli, args)
        assert run.exit_code == 0, run.output
        return out

    assert_same_updates(updates(merge_adapters([merge(DEVICE)])), updates(merge_adapters([merge("cpu")])), rtol=1e-5)
    ours, reference = folded(merge(DEVICE, "--fold-into", str(base))), folded(merge("cpu", "--fold-into", str(base)))
    assert ours.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(ours[name], weight, rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def fine_tunes(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tunes")
    return [fine_tune(tiny_llama, root / f"ft{k}", seed=k, norm=norm, shard="60KB") for k, norm in enumerate([0.5, 2.0, 1.2])]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "iso_c"])
def test_full_checkpoint_merge(base, fine_tunes, tmp_path, method):
    options = dict(method=method, density=0.5) if method == "ties" else dict(method=method)
    merge_checkpoints(base, fine_tunes, tmp_path / "device", MergeSpec(device=DEVICE, **options))
    merge_checkpoints(base, fine_tunes, tmp_path / "cpu", MergeSpec(**options))
    ours, reference = folded(tmp_path / "device"), folded(tmp_path / "cpu")
    assert ours.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(ours[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("truncation", ["exact", "randomized"])
def test_extract(base, fine_tunes, tmp_path, truncation):
    for device, folder in ((DEVICE, "device"), ("cpu", "cpu")):
        extract_lora(fine_tunes[1], base, ExtractSpec(rank=4, truncation=truncation, device=device)).save_pretrained(tmp_path / folder)
    ours = updates(merge_adapters([tmp_path / "device"]))
    # the randomized range finder's sketch is drawn on the CPU (seeded), so only rounding differs between devices
    assert_same_updates(ours, updates(merge_adapters([tmp_path / "cpu"])), rtol=1e-5 if truncation == "exact" else 1e-4)
