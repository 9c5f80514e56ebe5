"""A seconds-long run of the benchmark harness (python -m bench --tiny) on tiny shapes: the result files have
the documented keys (bench/report.py) and sane values. No timing is asserted: benchmarks are not tests."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import SECTIONS, main  # noqa: E402

CASE_KEYS = {"case", "params", "ratios", "check", "info", "peaks"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["--tiny", "--out", str(out), "--name", "smoke", "--mergekit", "none", "--scratch", str(out)]) == 0
    return json.loads((out / "smoke.json").read_text()), (out / "smoke.md").read_text()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_result_has_the_documented_keys(result):
    document, _ = result
    assert set(document) == {"machine", "run", "sections", "targets"}
    assert {"cpu", "cores", "memory_bytes", "gpu", "torch_threads", "versions"} <= set(document["machine"])
    assert {"command", "quick", "started", "seconds", "load_average_before", "load_average_after"} <= set(document["run"])
    assert list(document["sections"]) == list(SECTIONS)
    for section, entries in document["sections"].items():
        assert entries, section
        for entry in entries:
            assert CASE_KEYS <= set(entry), (section, set(entry))
            assert entry.get("times") or entry.get("processes"), section


def test_values_are_sane(result):
    document, _ = result
    for section, entries in document["sections"].items():
        for entry in entries:
            for name, timing in {**entry.get("times", {}), **entry.get("processes", {})}.items():
                assert positive(timing["median"]) and all(positive(t) for t in timing["times"]), (section, name)
                assert min(timing["times"]) <= timing["median"] <= max(timing["times"])
            for name, peak in entry["peaks"].items():
                assert isinstance(peak, int) and peak >= 0, (section, name)
            for name, ratio in entry["ratios"].items():  # a peak increase can be 0 on tiny shapes
                assert ratio is None or (math.isfinite(ratio) and ratio >= 0), (section, name, ratio)
    sections = document["sections"]
    norms = sections["norms"][0]
    assert norms["check"]["max |gram - dense float64| / max norm^2"] < 1e-10
    assert {"update_gram / read floor", "update_gram / float64 compute floor", "dense / update_gram (same layers)"} <= set(norms["ratios"])
    for section in ("svd", "cat"):
        entry = sections[section][0]
        assert entry["check"]["max relative difference from peft's merge"] < 1e-4  # the same merge as peft's
        assert positive(entry["ratios"]["peft / nan-peft time"])
    assert positive(sections["cli"][0]["processes"]["nan-peft merge (cat, exact)"]["peak"])
    fold = sections["fold"][0]
    assert positive(fold["ratios"]["fold (3 adapters) / safetensors copy"]) and fold["ratios"]["fold peak / model size"] >= 0
    assert "mergekit" in fold["notes"]  # skipped, and the result says so


def test_targets_and_markdown(result):
    document, markdown = result
    for target in document["targets"]:
        assert set(target) == {"section", "case", "target", "value", "limit", "met", "margin"}
        assert isinstance(target["met"], bool) and positive(target["margin"])
    assert any(t["section"] == "fold" for t in document["targets"])
    assert markdown.startswith("# nan-peft benchmark") and "## Targets" in markdown
    for section in SECTIONS:
        assert f"**{document['sections'][section][0]['case']}**" in markdown
