"""The command line, through click's runner and through the installed `nan-peft` entry point.

Outputs are compared with the library called directly (byte for byte) and with independent computations of
the numbers (inverse-norm coefficients, dense updates), not only exit codes.
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from models import make_adapter
from nan_peft import LoraAdapter, LoraModule, merge_adapters, read_adapter, read_adapters, update_gram
from nan_peft.cli import cli
from nan_peft.record import CARD_NAME, RECORD_NAME
from nan_peft.serving import ENGINES, loads, serving_findings

ENTRY_POINT = str(Path(sys.executable).parent / "nan-peft")
NAMES = ("small", "medium", "large")
WRITTEN = ["README.md", "adapter_config.json", "adapter_model.safetensors", "merge_record.json"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding three real peft adapters (different ranks and update norms); tests run inside it so
    that paths are relative, as a user would type them."""
    root = tmp_path_factory.mktemp("cli")
    make_adapter(root / "small", seed=11, magnitude=0.03, r=4, lora_alpha=8)
    make_adapter(root / "medium", seed=12, magnitude=0.1, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj", "o_proj"])
    make_adapter(root / "large", seed=13, magnitude=0.2, r=8, lora_alpha=16)
    return root


@pytest.fixture
def here(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def fail(code, *args):
    """Run a command that must fail: exit code `code`, one line `error: ...` on stderr, nothing on stdout."""
    result = run(*args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def inverse_norm_coefficients(norms, exponent=1.0, total=1.0):
    inverse = [n**-exponent for n in norms]
    return [total * v / sum(inverse) for v in inverse]


def dense_norm(adapter):
    return sum(m.delta().square().sum().item() for m in adapter.modules.values()) ** 0.5


def leftovers(parent, name):
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


# ---------------------------------------------------------------------------------------------------------
# merge


def test_merge_cat_writes_what_the_library_writes(here, tmp_path):
    result = ok("merge", *NAMES, "-o", "out-cat")
    assert sorted(p.name for p in (here / "out-cat").iterdir()) == WRITTEN

    library = merge_adapters(list(NAMES))
    library.save_pretrained(tmp_path / "lib")
    written = folder_bytes(here / "out-cat")
    for name, content in folder_bytes(tmp_path / "lib").items():
        assert written[name] == content, name

    norms = [dense_norm(read_adapter(n)) for n in NAMES]
    expected = inverse_norm_coefficients(norms)
    lines = result.stdout.splitlines()
    for name, path, coefficient, norm in zip(NAMES, NAMES, expected, norms):
        row = next(line.split() for line in lines if line.startswith(name + " "))
        assert row == [name, path, f"{norm:.4g}", f"{coefficient:.4g}"]
    assert "cat merge of 6 modules, rank 14" in result.stdout


def test_merge_svd_json_is_documented_and_exact(here, tmp_path):
    result = ok("merge", *NAMES, "-o", "out-svd", "--combine", "svd", "--rank", "4", "--exponent", "2", "--json")
    document = json.loads(result.stdout)
    assert set(document) == {"output", "files", "rank", "method", "rule", "combine", "dtype", "device", "coefficients", "adapters", "modules", "heads", "serve", "tensor_parallel", "engine_version", "fold_into"}
    assert document["heads"] == {"mode": "drop", "shared": [], "tasks": {}}
    assert document["output"] == "out-svd" and document["files"] == WRITTEN
    assert (document["rank"], document["combine"], document["method"], document["dtype"], document["device"]) == (4, "svd", "task_arithmetic", "float32", "cpu")
    assert document["rule"] == {"scale": 1.0}
    assert document["coefficients"] == {"method": "nan", "granularity": "adapter", "exponent": 2.0, "total": 1.0}

    norms = [dense_norm(read_adapter(n)) for n in NAMES]
    expected = inverse_norm_coefficients(norms, exponent=2)
    assert [a["name"] for a in document["adapters"]] == list(NAMES)
    assert [a["path"] for a in document["adapters"]] == list(NAMES)
    assert [a["norm"] for a in document["adapters"]] == pytest.approx(norms, rel=1e-9)
    assert [a["coefficient"] for a in document["adapters"]] == pytest.approx(expected, rel=1e-9)

    library = merge_adapters(list(NAMES), combine="svd", rank=4, exponent=2)
    assert [m["module"] for m in document["modules"]] == [r.module for r in library.report]
    sources = read_adapters(list(NAMES))
    for entry in document["modules"]:
        assert set(entry) == {"module", "input_rank", "rank", "norm", "discarded", "relative_discarded", "truncation", "coefficients"}
        path = entry["module"]
        dense = sum(c * s.modules[path].delta() for c, s in zip(expected, sources) if path in s.modules)
        singular = torch.linalg.svdvals(dense)
        assert entry["norm"] == pytest.approx(dense.norm().item(), rel=1e-9)
        assert entry["discarded"] == pytest.approx(singular[4:].square().sum().sqrt().item(), rel=1e-6, abs=1e-12)
        assert entry["relative_discarded"] == pytest.approx(entry["discarded"] / entry["norm"], rel=1e-12)
        assert entry["truncation"] in ("gram", "qr")  # the exact path: R = 14 is small
        assert entry["input_rank"] == sum(s.modules[path].rank for s in sources if path in s.modules)
        assert entry["coefficients"] == pytest.approx({n: c for n, c, s in zip(NAMES, expected, sources) if path in s.modules})
    assert any(entry["discarded"] > 0 for entry in document["modules"])

    library.save_pretrained(tmp_path / "lib")
    written = folder_bytes(here / "out-svd")
    for name, content in folder_bytes(tmp_path / "lib").items():
        assert written[name] == content, name


def test_weights_imply_manual_coefficients(here):
    document = json.loads(ok("merge", "small", "large", "-o", "out-manual", "--weights", "0.7,0.3", "--json").stdout)
    assert document["coefficients"] == {"method": "manual", "granularity": "adapter", "exponent": None, "total": None}
    assert [a["coefficient"] for a in document["adapters"]] == [0.7, 0.3]


def test_module_granularity_reports_coefficients_per_module(here):
    document = json.loads(ok("merge", *NAMES, "-o", "out-module", "--granularity", "module", "--json").stdout)
    assert all(a["coefficient"] is None for a in document["adapters"])
    sources = read_adapters(list(NAMES))
    for entry in document["modules"]:
        present = [s for s in sources if entry["module"] in s.modules]
        norms = [s.modules[entry["module"]].delta().norm().item() for s in present]
        expected = dict(zip((s.name for s in present), inverse_norm_coefficients(norms)))
        assert entry["coefficients"] == pytest.approx(expected, rel=1e-9)


def test_record_hashes_inputs_and_rerunning_it_gives_the_same_bytes(here):
    ok("merge", *NAMES, "-o", "out-record", "--combine", "svd", "--rank", "6", "--quiet")
    record = json.loads((here / "out-record" / RECORD_NAME).read_text())
    assert record["command"] == ["nan-peft", "merge", *NAMES, "-o", "out-record", "--combine", "svd", "--rank", "6"]
    assert [entry["path"] for entry in record["inputs"]] == list(NAMES)
    for entry in record["inputs"]:
        files = sorted((here / entry["path"]).glob("adapter_*"))
        assert entry["sha256"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    library = merge_adapters(list(NAMES), combine="svd", rank=6)
    assert record["norms"] == pytest.approx(library.norms, rel=1e-12)
    assert record["coefficients"]["per_adapter"] == pytest.approx(dict(zip(NAMES, library.coefficients.per_adapter.tolist())))
    assert record["options"]["combine"] == "svd" and record["options"]["rank"] == 6 and record["options"]["device"] == "cpu"
    assert [m["module"] for m in record["modules"]] == [r.module for r in library.report]
    assert [m["discarded"] for m in record["modules"]] == pytest.approx([r.discarded for r in library.report], rel=1e-9)
    assert isinstance(record["nan_peft_version"], str) and record["format"] == 1

    card = (here / "out-record" / CARD_NAME).read_text()
    assert "base_model" not in yaml.safe_load(card.split("---")[1])  # "tiny-llama" is no org/name Hub id: in the text only
    assert "`tiny-llama`" in card and 'PeftModel.from_pretrained(base, "out-record")' in card
    assert "nan-peft merge small medium large -o out-record --combine svd --rank 6" in card

    before = folder_bytes(here / "out-record")
    ok(*record["command"][1:], "--force")  # the recorded command, replacing the folder
    assert folder_bytes(here / "out-record") == before
    ok(*[a if a != "out-record" else "out-record-2" for a in record["command"][1:]])
    again = folder_bytes(here / "out-record-2")
    assert again["adapter_model.safetensors"] == before["adapter_model.safetensors"]
    assert again["adapter_config.json"] == before["adapter_config.json"]


def test_recipe_gives_the_same_merge_and_command_line_overrides_it(here, tmp_path):
    recipe = {"adapters": list(NAMES), "output": "out-recipe", "combine": "svd", "rank": 4, "exponent": 2, "total": 2}
    (here / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    ok("merge", "--config", "recipe.yaml", "-q")
    merge_adapters(list(NAMES), combine="svd", rank=4, exponent=2, total=2).save_pretrained(tmp_path / "lib")
    written = folder_bytes(here / "out-recipe")
    assert written["adapter_model.safetensors"] == (tmp_path / "lib" / "adapter_model.safetensors").read_bytes()
    record = json.loads(written[RECORD_NAME])
    assert record["recipe"] == recipe and record["command"] == ["nan-peft", "merge", "--config", "recipe.yaml"]

    document = json.loads(ok("merge", "--config", "recipe.yaml", "-o", "out-override", "--rank", "2", "small", "large", "--json").stdout)
    assert document["output"] == "out-override" and document["rank"] == 2
    assert [a["name"] for a in document["adapters"]] == ["small", "large"]
    assert document["coefficients"]["exponent"] == 2.0 and document["coefficients"]["total"] == 2.0
    assert sum(a["coefficient"] for a in document["adapters"]) == pytest.approx(2.0)
    assert not (here / "out-recipe-unused").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("adaptors: [small]\noutput: x\n", "unknown key 'adaptors'"),
        ("- small\n- large\n", "a recipe is a mapping"),
        ("adapters: small\noutput: x\n", "'adapters' must be a list"),
        ("adapters: [small\n", "not valid YAML"),
        ("adapters: [small, large]\noutput: x\nweights: [1, two]\n", "weights must be"),
        ("adapters: [small, large]\noutput: x\ncombine: fold\n", "unknown combine 'fold'"),
        ("adapters: [small, large]\noutput: x\nallow_different_bases: 'no'\n", "'allow_different_bases' must be true or false, not 'no'"),
        ("adapters: [small, large]\noutput: x\nrank: true\n", "'rank' must be an integer, not True"),
        ("adapters: [small, large]\noutput: x\nscale: high\n", "scale must be a number or auto, got 'high'"),
    ],
)
def test_bad_recipes_fail_with_one_line(here, text, message):
    (here / "bad.yaml").write_text(text)
    assert message in fail(1, "merge", "--config", "bad.yaml")
    assert not (here / "x").exists()


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["nope", "-o", "x"], 1, "error: nope: no such folder"),
        (["small", "large", "-o", "x", "--coefficients", "manual", "--weights", "1,1", "--total", "2"], 1, "no option total"),
        (["small", "large", "-o", "x", "--weights", "1"], 1, "got 1 weights for 2 adapters"),
        (["small", "large", "-o", "x", "--weights", "a,b"], 1, "weights must be a comma-separated list"),
        (["small", "large", "-o", "x", "--combine", "svd"], 1, "svd needs a target rank"),
        (["small", "large", "-o", "x", "--rank", "2"], 1, "cat is exact and needs rank >= 12"),
        (["small", "large", "-o", "x", "--device", "tpu"], 1, "unknown device 'tpu'"),
        (["small", "large", "-o", "x", "--method", "ties"], 1, "ties rule: needs density"),
        (["small", "large", "-o", "x", "--scale", "nan"], 1, "scale must be a finite number, got nan"),
        (["small", "large", "-o", "x", "--scale", "0"], 1, "scale 0 makes the merged update zero"),
        (["small", "large", "-o", "x", "--exponent", "inf"], 1, "exponent must be a finite number, got inf"),
        (["small", "large", "-o", "x", "--rank", "0"], 2, "'--rank': 0 is not in the range"),
        (["small", "large", "-o", "x", "--combine", "fold"], 2, "'--combine': 'fold' is not one of"),
        (["small", "large"], 2, "give the output folder with -o"),
        (["-o", "x"], 2, "give at least one ADAPTER"),
        (["small", "-o", "x", "--bogus"], 2, "No such option"),
    ],
)
def test_bad_input_exits_with_one_line_and_writes_nothing(here, args, code, message):
    line = fail(code, "merge", *args)
    assert message in line
    assert not (here / "x").exists() and leftovers(here, "x") == []


def test_a_quoted_false_in_a_recipe_never_replaces_an_output(here):
    """bool("false") is True: a recipe's force: "false" once replaced an existing output."""
    ok("merge", "small", "-o", "kept", "--quiet")
    before = folder_bytes(here / "kept")
    (here / "quoted.yaml").write_text("adapters: [small, large]\noutput: kept\nforce: 'false'\n")
    assert "'force' must be true or false, not 'false'" in fail(1, "merge", "--config", "quoted.yaml")
    assert folder_bytes(here / "kept") == before
    shutil.rmtree(here / "kept")


def test_serve_reports_the_rank_it_writes(here, tmp_path):
    """--serve vllm pads rank 14 (cat of 4 + 2 + 8) to 16: the table, --json, the record and the card say 16."""
    document = json.loads(ok("merge", "small", "medium", "large", "-o", tmp_path / "served", "--serve", "vllm", "--json", "--quiet").stdout)
    config = json.loads((tmp_path / "served" / "adapter_config.json").read_text())
    record = json.loads((tmp_path / "served" / RECORD_NAME).read_text())
    assert config["r"] == document["rank"] == record["rank"] == 16
    assert "one rank (16)" in (tmp_path / "served" / CARD_NAME).read_text()
    assert max(m["rank"] for m in record["modules"]) == 14  # each module's own merged rank, before padding


def test_norms_shows_an_adapter_given_twice(here):
    """norms writes nothing: the same adapter twice is shown (merge refuses it without --allow-duplicates)."""
    document = json.loads(ok("norms", "small", "small", "--json", "--quiet").stdout)
    norms = [a["norm"] for a in document["adapters"]]
    assert len(norms) == 2 and norms[0] == norms[1] == pytest.approx(dense_norm(read_adapter(here / "small")), rel=1e-12)


def test_usage_errors_point_to_help(here):
    assert fail(2, "merge", "small", "--rank", "0").endswith("(see 'nan-peft merge --help')")
    assert fail(2, "frobnicate").startswith("error: No such command")


def test_different_bases_need_the_flag(here, tmp_path):
    other = tmp_path / "other-base"
    shutil.copytree(here / "small", other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "another-llama"}))
    assert "different base models" in fail(1, "merge", "large", other, "-o", "out-bases")
    document = json.loads(ok("merge", "large", other, "-o", "out-bases", "--allow-different-bases", "--json").stdout)
    assert [a["name"] for a in document["adapters"]] == ["large", "other-base"]
    assert json.loads((here / "out-bases" / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_refuses_to_overwrite_without_force(here):
    ok("merge", "small", "large", "-o", "out-keep", "-q")
    before = folder_bytes(here / "out-keep")
    assert "out-keep already exists; pass --force" in fail(1, "merge", "small", "medium", "-o", "out-keep")
    assert folder_bytes(here / "out-keep") == before
    ok("merge", "small", "medium", "-o", "out-keep", "--force", "-q")
    assert folder_bytes(here / "out-keep") != before
    assert json.loads((here / "out-keep" / RECORD_NAME).read_text())["command"][2:4] == ["small", "medium"]
    assert leftovers(here, "out-keep") == []


def test_outputs_that_cannot_be_written_are_refused_before_any_work(here, monkeypatch):
    """A file, a broken link, the current folder, a path under a file: one line naming the output, before the
    adapters are read (reading is made to fail here, so reaching it would show), and nothing changed."""
    import nan_peft.cli

    monkeypatch.setattr(nan_peft.cli.app, "read_sources", lambda *a, **k: pytest.fail("read the adapters before checking -o"))
    (here / "a-file").write_text("keep")
    (here / "dangling").symlink_to(here / "nowhere")
    cases = [("a-file", "a-file is a file: the output is a folder, and a file is never replaced"),
             ("dangling", "dangling is a broken symbolic link"),
             (".", ". is the current folder"),
             ("a-file/sub", "cannot write a-file/sub: ")]
    for output, message in cases:
        assert message in fail(1, "merge", "small", "large", "-o", output, "--force"), output
    assert (here / "a-file").read_text() == "keep" and (here / "dangling").is_symlink()
    (here / "a-file").unlink()
    (here / "dangling").unlink()


def test_written_files_are_readable_as_the_umask_says(here, tmp_path):
    """safetensors creates its files 0600 and mkdtemp its folder 0700: a server running as another user could
    not read the adapter. Everything written gets the modes the umask gives new files and folders."""
    import os

    umask = os.umask(0o022)
    try:
        ok("merge", "small", "large", "-o", tmp_path / "modes", "-q")
    finally:
        os.umask(umask)
    assert (tmp_path / "modes").stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "modes").iterdir()} == dict.fromkeys(WRITTEN, 0o644)


def test_never_writes_over_an_input_even_with_force(here):
    before = folder_bytes(here / "small")
    line = fail(1, "merge", "small", "large", "-o", "small", "--force")
    assert "would replace or write into input" in line
    assert folder_bytes(here / "small") == before
    assert "would replace or write into input" in fail(1, "merge", "small", "large", "-o", "small/inside")
    assert not (here / "small" / "inside").exists()


def test_a_merge_that_fails_while_writing_leaves_nothing_behind(here, monkeypatch):
    import nan_peft.writer

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nan_peft.writer, "save_file", full_disk)
    assert "No space left on device" in fail(1, "merge", *NAMES, "-o", "out-failed")
    assert not (here / "out-failed").exists() and leftovers(here, "out-failed") == []


def test_debug_shows_the_error_itself(here):
    result = run("merge", "nope", "-o", "x", "--debug")
    assert result.exit_code == 1 and type(result.exception).__name__ == "NanPeftError"


# ---------------------------------------------------------------------------------------------------------
# norms


def test_norms_json_equals_dense_computation(here):
    document = json.loads(ok("norms", *NAMES, "--json").stdout)
    assert set(document) == {"adapters", "cosine_similarity", "options", "modules"}
    sources = read_adapters(list(NAMES))
    norms = [dense_norm(s) for s in sources]
    assert [a["name"] for a in document["adapters"]] == list(NAMES)
    assert [a["norm"] for a in document["adapters"]] == pytest.approx(norms, rel=1e-9)
    assert [a["ranks"] for a in document["adapters"]] == [[4], [2], [8]]
    assert [a["modules"] for a in document["adapters"]] == [4, 6, 4]

    def inner(a, b):
        return sum((a.modules[p].delta() * b.modules[p].delta()).sum().item() for p in a.modules if p in b.modules)

    cosine = [inner(a, b) / (na * nb) for a, na in zip(sources, norms) for b, nb in zip(sources, norms)]
    assert sum(document["cosine_similarity"], []) == pytest.approx(cosine, rel=1e-6, abs=1e-12)

    options = {(o["coefficients"], o["granularity"], o["exponent"]): o for o in document["options"]}
    assert set(options) == {("nan", "adapter", 1.0), ("nan", "adapter", 2.0), ("nan", "module", 1.0), ("uniform", "adapter", None)}
    for exponent in (1.0, 2.0):
        option = options[("nan", "adapter", exponent)]
        expected = inverse_norm_coefficients(norms, exponent)
        assert list(option["per_adapter"].values()) == pytest.approx(expected, rel=1e-9)
        merged = sum(
            sum(c * s.modules[p].delta() for c, s in zip(expected, sources) if p in s.modules).square().sum().item()
            for p in {p for s in sources for p in s.modules}
        ) ** 0.5
        assert option["merged_norm"] == pytest.approx(merged, rel=1e-9)
        assert option["error"] is None
    assert list(options[("uniform", "adapter", None)]["per_adapter"].values()) == pytest.approx([1 / 3] * 3)
    module_option = options[("nan", "module", 1.0)]
    assert module_option["per_adapter"] is None
    assert module_option["per_module_range"]["medium"][1] == pytest.approx(1.0)  # alone at o_proj

    gram = update_gram(sources)
    for entry, module, row in zip(document["modules"], gram.modules, gram.module_norms.tolist()):
        assert entry["module"] == module
        present = {s.name: n for s, n in zip(sources, row) if module in s.modules}
        assert entry["norms"] == pytest.approx(present, rel=1e-12)


def test_norms_table_shows_coefficients_and_similarities(here):
    stdout = ok("norms", *NAMES).stdout
    norms = [dense_norm(read_adapter(n)) for n in NAMES]
    header = stdout.splitlines()[0].split()
    assert header[:4] == ["adapter", "ranks", "modules", "norm"] and "uniform" in header
    for name, norm, c in zip(NAMES, norms, inverse_norm_coefficients(norms)):
        row = next(line.split() for line in stdout.splitlines() if line.startswith(name + " "))
        assert row[3:5] == [f"{norm:.4g}", f"{c:.4g}"]
    assert "cosine similarity of the updates" in stdout and "1.000" in stdout


def test_norms_of_a_zero_adapter_report_why_nan_is_undefined(here, tmp_path):
    zero = make_adapter(tmp_path / "zero", seed=1, magnitude=0.0)
    document = json.loads(ok("norms", "small", zero, "--json").stdout)
    nan = next(o for o in document["options"] if o["coefficients"] == "nan" and o["exponent"] == 1.0 and o["granularity"] == "adapter")
    assert "all-zero update" in nan["error"] and nan["per_adapter"] is None
    uniform = next(o for o in document["options"] if o["coefficients"] == "uniform")
    assert uniform["error"] is None


# ---------------------------------------------------------------------------------------------------------
# inspect and serving checks


def test_inspect_a_merged_adapter_every_engine_loads(here):
    ok("merge", *NAMES, "-o", "out-inspect", "--combine", "svd", "--rank", "16", "-q")
    document = json.loads(ok("inspect", "out-inspect", "--json").stdout)
    assert document["path"] == "out-inspect" and document["base_model"] == "tiny-llama"
    assert (document["r"], document["lora_alpha"], document["ranks"]) == (16, 16, [16])
    assert document["scaling"] == {"rule": "lora_alpha/r", "values": [1.0]}
    assert document["target_modules"] == ["o_proj", "q_proj", "v_proj"] and document["layers"] == [0, 1]
    assert document["modules"] == 6 and document["kinds"] == {"linear": 6} and document["variants"] == []
    assert document["parameters"] == sum(16 * (m.A.shape[1] + m.B.shape[0]) for m in read_adapter("out-inspect").modules.values())
    files = [here / "out-inspect" / n for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert document["size_bytes"] == sum(f.stat().st_size for f in files)
    assert set(document["serving"]) == set(ENGINES)
    for engine, verdict in document["serving"].items():
        assert verdict["loads"], (engine, verdict)
        assert all(f["level"] != "error" for f in verdict["findings"])
    assert {"level": "info", "message": "rank 16: start vLLM with --max-lora-rank 16 or more"} in document["serving"]["vllm"]["findings"]


def test_inspect_flags_what_engines_get_wrong(llama_adapters):
    _, patterns, rslora, layer1 = llama_adapters
    document = json.loads(ok("inspect", patterns, "--json").stdout)
    assert "rank_pattern" in document["variants"] and "alpha_pattern" in document["variants"]
    assert document["ranks"] == [2, 8]
    for engine in ("vllm", "lorax", "tgi"):
        assert not document["serving"][engine]["loads"]
        assert any("would get the wrong scale" in f["message"] for f in document["serving"][engine]["findings"])
    assert document["serving"]["peft"]["loads"]

    document = json.loads(ok("inspect", rslora, "--json").stdout)
    assert "rsLoRA" in document["variants"] and "embedding LoRA" in document["variants"]
    assert document["scaling"]["rule"] == "lora_alpha/sqrt(r) (rsLoRA)"
    assert document["scaling"]["values"] == pytest.approx([4 / 6**0.5])

    document = json.loads(ok("inspect", layer1, "--json").stdout)
    assert document["layers"] == [1] and "layers_to_transform" in document["variants"]
    assert not document["serving"]["lorax"]["loads"] and document["serving"]["vllm"]["loads"]

    text = ok("inspect", patterns).stdout
    assert "vllm     does NOT load as is" in text and "peft     loads as is" in text and "rank_pattern" in text


def linear(rank, scale=1.0, out=8, n=8, kind="linear"):
    return LoraModule(torch.ones(rank, n), torch.ones(out, rank), scale, kind)


def adapter(modules, **config):
    config = {"r": 8, "lora_alpha": 8, "base_model_name_or_path": "base", **config}
    return LoraAdapter("a", "a", config, modules)


def levels(findings, engine, level):
    return [f.message for f in findings[engine] if f.level == level]


def test_serving_refusals_follow_the_engines_rules():
    plain = {f"model.layers.{i}.self_attn.{t}": linear(8) for i in range(2) for t in ("q_proj", "v_proj")}
    findings = serving_findings(adapter(plain))
    assert all(loads(findings[e]) for e in ENGINES)
    assert levels(findings, "vllm", "info") == ["rank 8: start vLLM with --max-lora-rank 8 or more"]

    every_engine = tuple(e for e in ENGINES if e != "peft")
    for config, refused_by in [
        ({"use_dora": True}, every_engine),
        ({"modules_to_save": ["lm_head"]}, every_engine),
        ({"bias": "all"}, every_engine),
    ]:
        findings = serving_findings(adapter(plain, **config))
        assert {e for e in ENGINES if not loads(findings[e])} == set(refused_by), config

    big = serving_findings(adapter({"model.layers.0.self_attn.q_proj": linear(600)}, r=600, lora_alpha=600))
    assert any("exceeds vLLM's largest --max-lora-rank (512)" in m for m in levels(big, "vllm", "error"))
    assert any("outside 16..128" in m for m in levels(big, "lorax", "warning"))

    tgi_slow = serving_findings(adapter({"model.layers.0.self_attn.q_proj": linear(96)}, r=96, lora_alpha=96))
    assert any("above 64" in m for m in levels(tgi_slow, "tgi", "warning")) and not levels(tgi_slow, "lorax", "warning")
    assert levels(tgi_slow, "vllm", "info") == ["rank 96: start vLLM with --max-lora-rank 128 or more"]

    mixed = {"model.layers.0.mlp.up_proj": linear(4), "model.layers.1.mlp.up_proj": linear(2, scale=2.0)}
    findings = serving_findings(adapter(mixed))
    assert any("model.layers.*.mlp.up_proj modules of all layers" in m and "ranks differ ([2, 4])" in m for m in levels(findings, "lorax", "error"))

    partial = serving_findings(adapter({**plain, "model.layers.1.mlp.up_proj": linear(4)}))
    assert any("(model.layers.*.mlp.up_proj cover fewer layers" in m for m in levels(partial, "tgi", "error"))
    assert loads(partial["vllm"])
    unlayered = serving_findings(adapter({**plain, "model.embed_tokens": linear(8, kind="embedding")}))
    assert loads(unlayered["lorax"]) and loads(unlayered["tgi"])  # a module outside the layers is not partial
    assert any("would get the wrong scale" in m for m in levels(findings, "vllm", "error"))

    conv = serving_findings(adapter({"conv1": linear(4, kind="conv")}))
    assert not any(loads(conv[e]) for e in ("vllm", "lorax", "tgi")) and loads(conv["peft"])

    carried = adapter(plain)
    carried.extras["base_model.model.model.embed_tokens.base_layer.weight"] = torch.zeros(2, 2)
    assert not loads(serving_findings(carried)["vllm"])

    odd = serving_findings(adapter({"transformer.h.0.attn.c_attn": linear(4)}, unknown_key=1, base_model_name_or_path=None))
    assert any("c_attn" in m for m in levels(odd, "vllm", "warning"))
    assert any("unknown_key" in m for m in levels(odd, "peft", "warning"))
    assert any("no base_model_name_or_path" in m for m in levels(odd, "peft", "warning"))


def test_inspect_refused_adapter_fails_with_the_reason(tmp_path):
    folder = make_adapter(tmp_path / "dora", seed=1, use_dora=True)
    assert "DoRA" in fail(1, "inspect", folder)


# ---------------------------------------------------------------------------------------------------------
# help and the installed entry point


def test_help_lists_commands_in_order_and_groups_options():
    text = ok("--help").stdout
    assert [line.split()[0] for line in text.split("Commands:")[1].strip().splitlines()[:5]] == ["merge", "norms", "inspect", "extract", "demo"]
    merge_help = ok("merge", "--help").stdout
    headings = [line[:-1] for line in merge_help.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings == ["Input and output", "Coefficients", "Merge rule", "Combination", "Folding", "Execution", "Output"]
    for name in ("norms", "inspect", "demo"):
        assert "Output:" in ok(name, "--help").stdout


def entry_point(*args, cwd):
    return subprocess.run([ENTRY_POINT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_installed_entry_point_merges_like_the_runner(workdir, tmp_path):
    process = entry_point("merge", *[workdir / n for n in NAMES], "-o", tmp_path / "sub", "--combine", "svd", "--rank", "4", "--json", cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    document = json.loads(process.stdout)
    library = merge_adapters([workdir / n for n in NAMES], combine="svd", rank=4)
    assert [a["coefficient"] for a in document["adapters"]] == pytest.approx(library.coefficients.per_adapter.tolist(), rel=1e-12)
    library.save_pretrained(tmp_path / "lib")
    assert (tmp_path / "sub" / "adapter_model.safetensors").read_bytes() == (tmp_path / "lib" / "adapter_model.safetensors").read_bytes()


def test_installed_entry_point_reports_errors_in_one_line(workdir, tmp_path):
    process = entry_point("merge", "missing", "-o", "out", cwd=tmp_path)
    assert process.returncode == 1 and process.stdout == ""
    assert process.stderr.strip().splitlines() == ["error: missing: no such folder"]  # no traceback
    assert not (tmp_path / "out").exists()


def test_majority_sign_method_reaches_the_rule(here, tmp_path):
    result = ok("merge", *NAMES, "-o", "out-vote", "--method", "ties", "--density", "0.5", "--rank", "8",
                "--majority-sign-method", "frequency", "--json")
    assert json.loads(result.stdout)["rule"]["majority_sign_method"] == "frequency"
    library = merge_adapters(list(NAMES), method="ties", density=0.5, rank=8, majority_sign_method="frequency")
    library.save_pretrained(tmp_path / "lib")
    assert folder_bytes(tmp_path / "lib")["adapter_model.safetensors"] == folder_bytes(here / "out-vote")["adapter_model.safetensors"]
    total = merge_adapters(list(NAMES), method="ties", density=0.5, rank=8)
    assert not all(torch.equal(a.B, b.B) for a, b in zip(library.adapter.modules.values(), total.adapter.modules.values()))


def test_truncation_options_reach_combine_and_are_recorded(here):
    result = ok("merge", *NAMES, "-o", "out-sketch", "--combine", "svd", "--rank", "4", "--truncation", "randomized",
                "--oversample", "4", "--power-iterations", "2", "--sketch-seed", "7", "--json")
    document = json.loads(result.stdout)
    assert all(entry["truncation"] == ("randomized" if entry["input_rank"] > 4 else "gram") for entry in document["modules"])
    record = json.loads((here / "out-sketch" / "merge_record.json").read_text())
    assert {key: record["options"][key] for key in ("truncation", "oversample", "power_iterations", "sketch_seed")} == {
        "truncation": "randomized", "oversample": 4, "power_iterations": 2, "sketch_seed": 7}
    library = merge_adapters(list(NAMES), combine="svd", rank=4, truncation="randomized", oversample=4, power_iterations=2, sketch_seed=7)
    assert [r.discarded for r in library.report] == [entry["discarded"] for entry in document["modules"]]
    assert "'--oversample': -1 is not in the range" in fail(2, "merge", *NAMES, "-o", "x", "--combine", "svd", "--rank", "4", "--oversample", "-1")
