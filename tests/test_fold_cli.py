"""nan-peft merge --fold-into: the same model the Python call writes, with the merge record beside it."""

import json

import pytest
from click.testing import CliRunner

from models import make_adapter, tiny_llama
from nan_peft import merge_adapters
from nan_peft.cli import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("foldcli")
    tiny_llama().save_pretrained(root / "base", max_shard_size="40KB")
    adapters = [make_adapter(root / f"a{k}", seed=k, magnitude=0.1 * k) for k in (1, 2)]
    return root, [str(a) for a in adapters]


def test_cli_fold_equals_python_fold(setup, tmp_path):
    root, adapters = setup
    merge_adapters(adapters, combine="svd", rank=2).fold_into(root / "base", tmp_path / "py")
    result = CliRunner().invoke(cli, ["merge", *adapters, "-o", str(tmp_path / "cli"), "--combine", "svd", "--rank", "2",
                                      "--fold-into", str(root / "base"), "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["fold_into"] == str(root / "base") and "merge_record.json" in document["files"]
    weights = sorted(p.name for p in (tmp_path / "py").iterdir() if p.suffix == ".safetensors")
    assert len(weights) > 1  # sharded like the base
    for name in [*weights, "model.safetensors.index.json", "config.json"]:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "py" / name).read_bytes(), name
    record = json.loads((tmp_path / "cli" / "merge_record.json").read_text())
    assert record["options"]["fold_into"] == str(root / "base")


@pytest.mark.parametrize("extra,message", [
    (["--device-map", "cpu"], "--device-map and --max-memory go with --fold-into"),
    (["--fold-into", "x", "--serve", "vllm"], "--fold-into writes a full model"),
])
def test_cli_fold_usage_errors(setup, tmp_path, extra, message):
    _, adapters = setup
    result = CliRunner().invoke(cli, ["merge", *adapters, "-o", str(tmp_path / "out"), *extra])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_quiet_placed_fold_prints_nothing_on_stderr(setup, tmp_path):
    """--quiet silences transformers' own loading and saving bars too (the device-map path loads with it)."""
    import subprocess
    import sys
    from pathlib import Path

    root, adapters = setup
    entry = str(Path(sys.executable).parent / "nan-peft")
    run = subprocess.run([entry, "merge", *adapters, "-o", str(tmp_path / "placed"), "--fold-into", str(root / "base"),
                          "--device-map", "cpu", "--quiet"], capture_output=True, text=True)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert (tmp_path / "placed" / "config.json").exists()
