"""A seconds-long run of the evaluation in eval/ (docs/results.md), so that its code cannot rot.

Experiment 1 runs as is on small sizes; experiment 2 runs its whole pipeline (cache, LoRA training with peft,
merges through nan_peft, scoring, tables) on a tiny random BERT with synthetic tasks instead of MiniLM and
the registry data. Needs only torch, transformers and peft (the plot test skips without matplotlib).
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import lora_tasks, report, theory  # noqa: E402


def test_theory_nan_tracks_data_volume_when_updates_are_zero_mean():
    case = theory.Case(volumes=(40, 160, 640), d=8, m=4)
    s = theory.run_case(case, trials=6, seed=0)
    volume = np.array(case.volumes) / sum(case.volumes)
    assert np.allclose(s["data volume"]["coefficients"], volume)
    # more data -> smaller update norm -> larger NAN coefficient
    assert s["norms"][0] > s["norms"][1] > s["norms"][2]
    assert s["NAN p=1"]["coefficients"][0] < 1 / 3 < s["NAN p=1"]["coefficients"][2]
    # NAN is closer to the optimal weights than uniform, p = 2 (inverse variance) closest, and so is its loss
    assert s["NAN p=2"]["coefficient_distance"] < s["NAN p=1"]["coefficient_distance"] < s["uniform"]["coefficient_distance"]
    assert s["NAN p=2"]["gap_vs_uniform"] < s["NAN p=1"]["gap_vs_uniform"] < 0.5
    assert s["best coefficients"]["gap_vs_uniform"] <= s["NAN p=2"]["gap_vs_uniform"] + 1e-9
    assert s["uniform"]["gap_vs_uniform"] == 1.0


def test_theory_zero_mean_assumption_breaks():
    base = dict(volumes=(40, 160, 640), d=8, m=4)
    shifted = theory.run_case(theory.Case(**base, shift=8.0), trials=4, seed=1)
    # a large common shift dominates every norm: NAN falls back to about uniform
    assert np.allclose(shifted["NAN p=1"]["coefficients"], 1 / 3, atol=0.05)
    assert shifted["NAN p=1"]["gap_vs_uniform"] > 0.8
    # task-specific shifts, the largest on the smallest task: NAN follows the shift sizes, not the data
    moved = theory.run_case(theory.Case(**base, spread=4.0, spread_profile=(2.0, 1.0, 0.5)), trials=4, seed=2)
    assert moved["NAN p=1"]["coefficients"][0] < moved["NAN p=1"]["coefficients"][2]
    reverse = theory.run_case(theory.Case(**base, spread=4.0), trials=4, seed=3)
    assert reverse["NAN p=1"]["gap_vs_uniform"] > 1.0  # worse than uniform: it down-weighs the task that moved most


def test_theory_tables_render():
    results = {"trials": 2, "sweeps": {"volume ratio": {"axis": "ratio", "cases": [
        theory.run_case(theory.Case(volumes=(32, 64, 128), d=4, m=2), trials=2, seed=0)]}}}
    text = report.theory_tables(results)
    assert "volume ratio" in text and "| 4 |" in text


TINY = lora_tasks.Setup(model="tiny", train_sizes={"a": 64, "b": 32, "c": 16}, test_size=32, max_length=12,
                        split=2, rank=4, alpha=8, steps=30, batch=8, lr=1e-2, seeds=(0,),
                        volume_task="a", volume_sizes=(8, 16, 32))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    import torch

    cache = tmp_path_factory.mktemp("eval-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        first = lora_tasks.run(TINY, cache, log=lambda message: None)
        again = lora_tasks.run(TINY, cache, score_only=True, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    return first, again


def test_lora_pipeline_runs_and_scores_every_model(tiny_results):
    results, again = tiny_results
    rows = results["rows"]
    names = [r["name"] for r in rows]
    expected = ["linear probe (no adapter)", "base encoder + task heads", *(f"adapter {t} alone" for t in "abc")]
    assert names == expected + [lora_tasks.spec_name(s) for s in lora_tasks.merge_specs(3)]
    for row in rows + results["volume_rows"]:
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    # every adapter learned its own task (synthetic marker tokens: far above chance)
    for t, classes in zip("abc", (2, 3, 2)):
        assert rows[names.index(f"adapter {t} alone")]["accuracy"][t] > 1 / classes + 0.15
    # coefficients: NAN sums to the asked total and orders the tasks inversely to their update norms
    for row in rows[len(expected):]:
        total = sum(row["coefficients"].values())
        if row["spec"].get("granularity") != "module":
            assert total == pytest.approx(row["spec"]["total"])
    nan = rows[names.index("task_arithmetic/nan/total1")]
    order_norm = sorted("abc", key=lambda t: nan["norms"][t])
    order_coef = sorted("abc", key=lambda t: -nan["coefficients"][t])
    assert order_norm == order_coef
    # the volume scenario has the data-volume reference and scores on one task
    volume = {r["name"]: r for r in results["volume_rows"]}
    assert volume["task_arithmetic/data volume/total1"]["coefficients"] == pytest.approx({"8": 1 / 7, "16": 2 / 7, "32": 4 / 7})
    # --score-only reuses the cached adapters and gives the same numbers
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows]


def test_cached_split_forward_matches_the_model_with_padding():
    """Training and scoring run the top layers on cached bottom states: exact, padding included."""
    import torch

    bert = lora_tasks.load_encoder(TINY)
    ids = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    assert lora_tasks.check_split(bert, ids, mask, split=2) < 1e-5
    hidden, m = lora_tasks.trim(lora_tasks.bottom(bert, ids, mask, 2), mask)
    assert hidden.shape[1] == 10 and torch.equal(m, mask)


def test_lora_merged_update_is_what_the_model_scores():
    """apply_update folds exactly the merge's dense update into the weights, and takes it out again."""
    import torch

    bert = lora_tasks.load_encoder(TINY)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    adapters = [lora_tasks.nan_peft.LoraAdapter(
        name=f"x{k}", source="", config={},
        modules={"encoder.layer.1.attention.self.query": lora_tasks.nan_peft.LoraModule(
            A=torch.randn(2, 32, dtype=torch.float64), B=torch.randn(32, 2, dtype=torch.float64), scale=0.5)})
        for k in range(2)]
    result = lora_tasks.nan_peft.merge_adapters(adapters)
    lora_tasks.apply_update(bert, result.adapter)
    weight = bert.encoder.layer[1].attention.self.query.weight
    expected = before["encoder.layer.1.attention.self.query.weight"].double() + sum(
        c * a.modules["encoder.layer.1.attention.self.query"].delta() for c, a in zip(result.coefficients.per_adapter.tolist(), adapters))
    assert torch.allclose(weight.double(), expected, atol=1e-5)
    lora_tasks.apply_update(bert, result.adapter, -1.0)
    assert torch.allclose(weight, before["encoder.layer.1.attention.self.query.weight"], atol=1e-5)


def test_lora_tables_and_plots(tiny_results, tmp_path):
    results = tiny_results[0]
    text = report.lora_tables(results)
    assert "task_arithmetic/nan/total1" in text and "± " in text
    pytest.importorskip("matplotlib")
    paths = report.lora_plots(results, tmp_path)
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
