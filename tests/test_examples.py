"""The examples run, and say what they should; the hot-swap server never serves a half-published adapter."""

import sys
import threading
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import nan_peft

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))

import hot_swap_server  # noqa: E402
import live_merge  # noqa: E402
import merge_two_adapters  # noqa: E402
from _inputs import demo_inputs  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return demo_inputs(tmp_path_factory.mktemp("inputs"))


def logits_of(base, adapter, ids):
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(ids).logits


def test_merge_two_adapters(inputs, tmp_path):
    out = merge_two_adapters.main([*map(str, inputs[1][:2]), "--out", str(tmp_path)])
    inverse = [1 / n for n in out["norms"].values()]
    assert out["nan"] == pytest.approx([v / sum(inverse) for v in inverse], rel=1e-12)
    assert nan_peft.read_adapter(out["output"]).modules


def test_live_merge_saves_what_it_serves():
    out = live_merge.main()
    ids = torch.arange(12).reshape(1, 12)
    torch.testing.assert_close(logits_of(out["base"], out["saved"], ids), out["logits"], rtol=1e-5, atol=1e-6)
    assert out["result"].rank == 8


def test_hot_swap_example():
    out = hot_swap_server.main()
    assert out["swaps"] == 2 and (out["first"] - out["second"]).abs().max() > 1e-3


def test_server_never_serves_a_partial_adapter(inputs, tmp_path):
    """A publisher re-publishes two merges in turn while the server polls and serves: every answer is the base
    model's or exactly one of the two merges', and the server ends up serving the last one published."""
    base, adapters = inputs
    versions = [nan_peft.merge_adapters(adapters), nan_peft.merge_adapters(adapters, coefficients="uniform")]
    ids = torch.arange(8).reshape(1, 8)
    expected = []
    for k, version in enumerate(versions):
        version.save_pretrained(tmp_path / f"ref{k}")
        expected.append(logits_of(base, tmp_path / f"ref{k}", ids))
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        expected.append(base_model(ids).logits)

    served = tmp_path / "served"
    server = hot_swap_server.HotSwapServer(base_model, served)
    done = threading.Event()

    def publish():
        for i in range(12):
            versions[i % 2].save_pretrained(served, overwrite=True)
        done.set()

    publisher = threading.Thread(target=publish)
    publisher.start()
    answers = 0
    while not done.is_set() or answers == 0:
        server.poll()
        logits = server(ids)
        assert any(torch.allclose(logits, e, rtol=1e-5, atol=1e-6) for e in expected)
        answers += 1
    publisher.join()
    server.poll()
    torch.testing.assert_close(server(ids), expected[1], rtol=1e-5, atol=1e-6)  # the last publish (i = 11) is version 1
    assert server.swaps >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref0", "ref1", "served"]  # no temporary folders left


@pytest.mark.parametrize("failure", ["re-published while read", "folder gone while read"])
def test_an_interrupted_load_leaves_the_served_model_as_it_was(inputs, tmp_path, failure):
    """A load that is discarded (the folder changed while it was read) or fails (the folder vanished between the
    check and the read) leaves the server serving what it served before: the bare base model at first (peft
    injects LoRA layers into the base itself), the previous merge after a swap."""
    base, adapters = inputs
    served = tmp_path / "served"
    nan_peft.merge_adapters(adapters).save_pretrained(served)
    ids = torch.arange(8).reshape(1, 8)
    for before_first in (True, False):
        server = hot_swap_server.HotSwapServer(AutoModelForCausalLM.from_pretrained(base).eval(), served)
        if not before_first:
            assert server.poll()
            nan_peft.merge_adapters(adapters, coefficients="uniform").save_pretrained(served, overwrite=True)
        expected = server(ids)
        identity = server._identity

        def interrupted():
            server._identity = changed
            if failure == "folder gone while read":
                served.rename(tmp_path / "aside")
            return identity()

        def changed():
            server._identity = identity
            now = identity() if (served).exists() else (0, 0, 0)
            return now if failure == "folder gone while read" else (*now[:2], now[2] + 1)

        server._identity = interrupted
        assert server.poll() is False
        if (tmp_path / "aside").exists():
            (tmp_path / "aside").rename(served)
        torch.testing.assert_close(server(ids), expected, rtol=0, atol=0)
        if before_first:
            assert server.model is None and not any("lora" in name for name, _ in server.base.named_modules())
        else:
            assert list(server.model.peft_config) == ["v1"]
        assert server.poll() and server.swaps == (1 if before_first else 2)


def test_merge_and_fold():
    import merge_and_fold

    out = merge_and_fold.main()
    torch.testing.assert_close(out["folded"], out["adapter"], rtol=1e-5, atol=1e-5)
