"""A seconds-long run of the evaluation in eval/ (docs/results.md), so that its code cannot rot.

Experiment 1 runs as is on small sizes; experiment 2 runs its whole pipeline (cache, LoRA training with peft,
merges through nan_peft, scoring, tables) on a tiny random BERT with synthetic tasks instead of MiniLM and
the registry data. Needs only torch, transformers and peft (the plot test skips without matplotlib).
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval import data, lora_tasks, report, splits, theory  # noqa: E402


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


TINY = lora_tasks.Setup(model="tiny", train_sizes={"a": 64, "b": 32, "c": 16}, test_size=32, val_size=16, max_length=12,
                        split=2, rank=4, alpha=8, wide_rank=8, steps=30, batch=8, lr=1e-2, seeds=(0,),
                        volume_task="a", volume_sizes=(8, 16, 32))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    import torch

    cache = tmp_path_factory.mktemp("eval-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    try:
        val = lora_tasks.run(TINY, cache, stage="val", log=lambda message: None)
        first = lora_tasks.run(TINY, cache, log=lambda message: None)
        again = lora_tasks.run(TINY, cache, score_only=True, log=lambda message: None)
        # a cache from before a rule was added: its validation sweeps are computed and added, the rest reused
        for cached in cache.rglob("val-scores.json"):
            fixed = json.loads(cached.read_text())
            fixed["sweeps"] = {key: value for key, value in fixed["sweeps"].items() if not key.startswith("knots_dare + svc/")}
            fixed["rows"] = [row for row in fixed["rows"] if row.get("rule") != "knots_dare + svc"]
            cached.write_text(json.dumps(fixed))
        added = lora_tasks.run(TINY, cache, score_only=True, log=lambda message: None)
    finally:
        torch.set_num_threads(threads)
    return first, again, val, added


def test_lora_pipeline_runs_and_scores_every_model(tiny_results):
    from eval import multitask
    from nan_peft.scale import GAMMA

    results, again, val, added = tiny_results
    rows = results["rows"]
    assert {r["setting"] for r in rows} == {"r4", "r8-all"}
    assert all(r["split"] == "val" or r["kind"] in ("reference", "individual") for r in val["rows"])
    for row in rows + results["volume_rows"]:
        assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    for setting in ("r4", "r8-all"):
        # every adapter learned its own task (synthetic marker tokens: far above chance)
        for t, classes in zip("abc", (2, 3, 2)):
            alone = [r for r in rows if r["setting"] == setting and r["name"] == f"adapter {t} alone" and r["split"] == "test"]
            assert alone[0]["accuracy"][t] > 1 / classes + 0.15
        for rule in multitask.RULES:
            for coefficients in multitask.COEFFICIENTS:
                mine = [r for r in rows if r["setting"] == setting and r.get("rule") == rule and r.get("coefficients") == coefficients]
                sweep = {r["gamma"]: r for r in mine if r["kind"] == "sweep"}
                assert sorted(sweep) == sorted(multitask.GRID) and all(r["split"] == "val" for r in sweep.values())
                chosen, = [r for r in mine if r["kind"] == "val-chosen"]
                # the scale is chosen on validation: the sweep's best gamma
                assert chosen["gamma"] == max(sweep, key=lambda g: (sweep[g]["mean_normalized"], -g)) and chosen["split"] == "test"
                auto, = [r for r in mine if r["kind"] == "auto"]
                assert auto["gamma"] == pytest.approx(GAMMA, rel=1e-6)  # --scale auto sets the norm to GAMMA x the mean norm
                for r in (chosen, auto):
                    assert r["mean_normalized"] == pytest.approx(sum(r["normalized"].values()) / 3)
        total1 = [r for r in rows if r["setting"] == setting and r["kind"] == "total 1"]
        assert len(total1) == 2 and all(r["scale"] == 1.0 for r in total1)
    # the volume scenario has the data-volume reference and scores on one task
    volume = {r["name"]: r for r in results["volume_rows"]}
    assert volume["task_arithmetic/data volume/total1"]["coefficients"] == pytest.approx({"8": 1 / 7, "16": 2 / 7, "32": 4 / 7})
    # --score-only reuses the cached adapters and gives the same numbers
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows]
    # a rule added to a cached run: its sweep is computed, every row as in the whole run
    def keyed(rows):
        return {(r["setting"], r["name"], r["kind"], r["split"], r.get("coefficients"), r.get("gamma")): r["accuracy"] for r in rows}
    assert keyed(added["rows"]) == keyed(rows) and len(added["rows"]) == len(rows)
    for t, classes in zip("abc", (2, 3, 2)):
        base = results["test_baselines"][t]
        assert sum(base["counts"]) == TINY.test_size and len(base["counts"]) == classes
        assert base["majority"] == max(base["counts"]) / TINY.test_size


def test_tiny_pipeline_trains_on_no_test_example(tiny_results, tmp_path):
    import torch

    cache = tmp_path / "cache"
    _, _, plan = lora_tasks.prepare(TINY, cache, log=lambda message: None)
    for entry in plan.values():
        trained = {i for idx in entry["train"].values() for i in idx}
        trained |= {i for parts in entry.get("volume", {}).values() for part in parts for i in part}
        assert not set(entry["test"]) & trained and not set(entry["val"]) & trained and not set(entry["val"]) & set(entry["test"])
    saved = torch.load(lora_tasks.states_path(cache, TINY.seeds), weights_only=True)
    assert saved["splits"] == plan


def test_split_refuses_a_test_text_that_is_also_trained_on():
    import torch

    setup = lora_tasks.Setup(model="tiny", train_sizes={"a": 20}, test_size=10, val_size=4, seeds=(0, 1), volume_task="a",
                             volume_sizes=(4, 8))
    labels = {"a": torch.zeros(40, dtype=torch.long)}
    texts = [f"text {i}" for i in range(40)]
    plan = splits.splits(setup, labels, {"a": [texts]})  # unique texts: fine
    test, trained = plan["a"]["test"], plan["a"]["train"][0]
    leaked = list(texts)
    leaked[trained[0]] = leaked[test[0]]  # the same text on both sides of the split
    with pytest.raises(splits.Leak):
        splits.splits(setup, labels, {"a": [texts, leaked]})
    # the volume adapters' samples are checked too
    volume_only = [i for part in plan["a"]["volume"][1] for i in part if i not in set().union(*map(set, plan["a"]["train"].values()))]
    if volume_only:
        leaked = list(texts)
        leaked[volume_only[0]] = leaked[test[0]]
        with pytest.raises(splits.Leak):
            splits.splits(setup, labels, {"a": [leaked]})


def test_probing_tasks_perturb_half_of_their_own_sentences():
    """Each probing task: its own sentences (no other task's), about half perturbed as its rule says (label 1), the
    rest verbatim, and the same texts on every call."""
    import random

    def check(name, original, perturbed):
        a, b = original.split(), perturbed.split()
        if name == "replace":
            assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 1
        elif name == "halves":
            assert b == a[len(a) // 2:] + a[:len(a) // 2]
        else:
            assert sorted(a) == sorted(b)  # a permutation of the same words
            moved = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
            if name == "bshift" and moved:
                assert len(moved) == 2 and moved[1] == moved[0] + 1
            if name == "reverse" and moved:
                assert moved[-1] - moved[0] <= 3

    seen = set()
    for name, perturb in {**data.PROBES, **data.SPARE_PROBES}.items():
        words = "one two three four five six seven eight nine ten eleven".split()
        out = list(words)
        perturb(out, random.Random(0), ["zebra"])
        check(name, " ".join(words), " ".join(out))
        assert out != words
        try:
            texts, labels, names = data.LOADERS[name]()
        except data.MissingData:
            return
        assert names == ["original", "perturbed"] and 0.45 < sum(labels) / len(labels) < 0.55
        assert (texts, labels) == data.LOADERS[name]()[:2]
        sentences = data._sentences()
        start = list(data.PROBES).index(name) * data.PROBE_SENTENCES if name in data.PROBES else len(data.PROBES) * data.PROBE_SENTENCES
        own = {s: i for i, s in enumerate(sentences[start:][:data.PROBE_SENTENCES])}
        verbatim = [t for t, y in zip(texts, labels) if y == 0]
        assert all(t in own for t in verbatim) and not seen.intersection(texts)
        seen.update(texts)


def test_loaders_drop_duplicates_before_splitting():
    texts, labels = data.unique(["a  b", "c", "a b", " c ", "d"], [0, 1, 0, 1, 2])
    assert texts == ["a  b", "c", "d"] and labels == [0, 1, 2]
    try:  # the real data, where it is installed (eval/requirements.txt)
        loaded = {task: loader() for task, loader in data.LOADERS.items()}
    except data.MissingData:
        return
    for task, (texts, labels, names) in loaded.items():
        normalised = [data.normalise(t) for t in texts]
        assert len(set(normalised)) == len(normalised), task
    import torch

    for suite in lora_tasks.SUITES.values():  # every suite's tasks split without a leak
        setup = lora_tasks.Setup(**suite)
        tasks = {t: loaded[t] for t in setup.train_sizes}
        plan = splits.splits(setup, {t: torch.tensor(v[1]) for t, v in tasks.items()},
                             {t: [[data.normalise(x) for x in v[0]]] for t, v in tasks.items()})
        assert set(plan) == set(setup.train_sizes)


def test_metrics_and_baseline():
    import torch

    labels = torch.tensor([1, 1, 1, 0])
    constant = lora_tasks.metrics(torch.ones(4, dtype=torch.long), labels)
    assert constant == {"accuracy": 0.75, "balanced": 0.5}
    assert lora_tasks.metrics(labels, labels) == {"accuracy": 1.0, "balanced": 1.0}
    assert lora_tasks.baseline(labels, 3) == {"counts": [1, 3, 0], "majority": 0.75, "balanced_of_constant": 0.5}


def test_init_seeds_differ_per_adapter_and_cache_key_has_a_version(monkeypatch):
    import zlib

    seeds = {lora_tasks.derived_seed(s, t) for s in (0, 1) for t in ("news", "sentiment", "condition", "same-task-64")}
    assert len(seeds) == 8
    assert lora_tasks.derived_seed(0, "news") == zlib.crc32(b"0/news")  # not Python's salted hash()
    key = TINY.key()
    monkeypatch.setattr(lora_tasks, "CACHE_VERSION", lora_tasks.CACHE_VERSION + 1)
    assert TINY.key() != key


def test_quick_refuses_no_seeds():
    from eval import run

    with pytest.raises(SystemExit):
        run.main(["--quick", "--seeds", "0", "--only", "lora"])
    with pytest.raises(SystemExit):
        run.main(["--quick", "--seeds", "2", "--seed", "1", "--only", "lora"])


def test_a_seeds_work_is_shared_by_every_run_that_has_the_seed():
    """The cache folder does not depend on the seeds, and a seed's training sample does not depend on the other seeds
    run beside it: adapters trained by `--seed 1` alone are the ones a three-seed run would train."""
    from dataclasses import replace

    import torch

    one, three = replace(TINY, seeds=(1,)), replace(TINY, seeds=(0, 1, 2))
    assert one.key() == three.key() and replace(TINY, steps=TINY.steps + 1).key() != one.key()
    labels = {"a": torch.arange(200) % 2}
    keys = {"a": [[f"text {i}" for i in range(200)]]}
    small, large = (splits.splits(replace(s, train_sizes={"a": 40}), labels, keys) for s in (one, three))
    assert small["a"]["train"][1] == large["a"]["train"][1] and small["a"]["test"] == large["a"]["test"]


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
    from eval import report_merges

    results = tiny_results[0]
    text = report_merges.tables(results)
    assert "### Setting r4" in text and "linear probe" in text and "± " not in text.split("### Setting")[0]
    assert "The auto scale's design" in text and "Default rule" in text
    pytest.importorskip("matplotlib")
    paths = report_merges.plots(results, tmp_path)
    assert len(paths) == 2 and all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_gamma_is_the_best_of_both_suites_validation_rows():
    """--scale auto's GAMMA is what eval/gamma.py finds on the committed validation sweeps of both suites, and the
    design reads no test row (a test row that would change the choice is ignored)."""
    from eval import gamma
    from eval.multitask import AUTO_DESIGN
    from nan_peft.scale import GAMMA

    found = gamma.design(gamma.load())
    assert found["best"] == GAMMA and set(found["suites"]) == {"text", "probing2"}
    rows = [{"kind": "sweep", "split": split, "rule": AUTO_DESIGN[0], "gamma": g, "mean_normalized": value, "seed": 0}
            for split, g, value in (("val", 0.5, 0.9), ("val", 1.0, 0.8), ("test", 1.0, 2.0))]
    assert gamma.design({"a": rows})["best"] == 0.5


def test_the_default_candidate_is_chosen_on_validation_at_gamma_and_compared_paired_on_test():
    from eval import defaults
    from nan_peft.scale import GAMMA

    def row(kind, split, rule, coefficients, value, seed=0, gamma=GAMMA, setting="r8"):
        return {"kind": kind, "split": split, "rule": rule, "coefficients": coefficients, "mean_normalized": value,
                "seed": seed, "gamma": gamma, "setting": setting}

    a = [row("sweep", "val", "tsv", "nan", 0.9), row("sweep", "val", "iso_c", "nan", 0.95), row("sweep", "val", "iso_c", "nan", 2.0, gamma=GAMMA / 2),
         row("auto", "test", "iso_c", "nan", 0.5, seed=0), row("auto", "test", "iso_c", "nan", 0.7, seed=1),
         row("total 1", "test", "task_arithmetic", "nan", 0.4, seed=0), row("total 1", "test", "task_arithmetic", "nan", 0.3, seed=1),
         row("total 1", "test", "task_arithmetic", "uniform", 0.6, seed=0)]
    b = [row("sweep", "val", "tsv", "nan", 0.9), row("sweep", "val", "iso_c", "nan", 0.9), row("sweep", "val", "wudi", "nan", 1.0)]
    chosen, score = defaults.candidate({"a": a, "b": b})
    assert chosen == ("iso_c", "nan") and score[chosen] == pytest.approx(0.925) and ("wudi", "nan") not in score
    rows = defaults.compare({"a": a}, chosen)
    assert [r["difference"] for r in rows] == [pytest.approx([0.1, 0.4]), pytest.approx([-0.1])]
    assert "**not met**" in defaults.table(chosen, rows)
