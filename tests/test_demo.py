"""`nan-peft demo`: runs offline and fast, its numbers are right, and its merge is what `nan-peft merge` writes."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nan_peft import read_adapter
from nan_peft.cli import cli
from nan_peft.demo import ADAPTERS, run_demo
from nan_peft.record import RECORD_NAME


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "a run"  # a space: the printed command must quote it
    lines = []
    return run_demo(folder, say=lines.append), lines


def test_demo_merges_exactly_with_nan_coefficients(demo):
    report, lines = demo
    assert [a.name for a in report.adapters] == [spec[0] for spec in ADAPTERS]
    assert [a.rank for a in report.adapters] == [spec[1] for spec in ADAPTERS]
    assert report.rank == sum(spec[1] for spec in ADAPTERS)

    norms = []
    for entry in report.adapters:
        source = read_adapter(report.folder / entry.name)
        assert source.base_model == str(report.folder / "base")
        norms.append(sum(m.delta().square().sum().item() for m in source.modules.values()) ** 0.5)
    assert [a.norm for a in report.adapters] == pytest.approx(norms, rel=1e-9)
    assert max(norms) / min(norms) > 3  # deliberately different update norms
    inverse = [1 / n for n in norms]
    assert [a.coefficient for a in report.adapters] == pytest.approx([v / sum(inverse) for v in inverse], rel=1e-9)

    assert report.max_abs_difference < 1e-5  # the merge equals the sources applied together, scaled
    assert report.max_abs_effect > 1e-2  # and the check is not vacuous: the adapters change the logits
    assert len(lines) == 4 and all(line for line in lines)
    merged = read_adapter(report.merged)
    assert merged.ranks == {report.rank} and merged.base_model == str(report.folder / "base")


def test_demo_merge_is_what_the_recorded_command_writes(demo, tmp_path):
    report, _ = demo
    record = json.loads((report.merged / RECORD_NAME).read_text())
    assert record["command"] == shlex.split(report.command)
    before = {p.name: p.read_bytes() for p in report.merged.iterdir()}
    result = CliRunner().invoke(cli, [*record["command"][1:], "--force", "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert {p.name: p.read_bytes() for p in report.merged.iterdir()} == before


def test_demo_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["demo", "-o", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {tmp_path} is not empty; pass --force to write the demo into it anyway"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_installed_demo_runs_offline_in_seconds(demo, tmp_path):
    report, _ = demo
    start = time.monotonic()
    process = subprocess.run(
        [str(Path(sys.executable).parent / "nan-peft"), "demo", "-o", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")},  # nothing to download from
    )
    elapsed = time.monotonic() - start
    assert process.returncode == 0, process.stderr
    assert elapsed < 60
    lines = process.stdout.splitlines()
    assert lines[0].split() == ["adapter", "rank", "norm", "NAN", "coefficient"]
    for entry, line in zip(report.adapters, lines[2:5]):
        assert line.split() == [entry.name, str(entry.rank), f"{entry.norm:.4g}", f"{entry.coefficient:.4g}"]
    difference = float(re.search(r"max \|logits\(merged\) - logits\(sources, scales x coefficients\)\| = (\S+)", process.stdout).group(1))
    assert difference < 1e-5
    # same seed, same bytes: the merged factors do not depend on the run
    assert (tmp_path / "d" / "merged" / "adapter_model.safetensors").read_bytes() == (report.merged / "adapter_model.safetensors").read_bytes()
