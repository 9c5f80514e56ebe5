"""Hub inputs (`org/name`, `org/name@revision`, `org/name/subfolder[@revision]`), offline: a Hub cache laid out as
huggingface_hub lays it out is prepared in a temporary folder and huggingface_hub's snapshot_download reads it
with the Hub switched off. The merge record pins each Hub input's commit; a local folder always wins."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from models import make_adapter, tiny_llama
from nan_peft import NanPeftError, merge_adapters, read_adapter
from nan_peft.cli import cli
from nan_peft.hub import HubRef, parse, provenance

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft: "Could not find a config file in tiny-llama"


def cache_repo(cache: Path, repo_id: str, files: dict, refs=("main",)) -> str:
    """Put `files` ({path in the repo: a file to copy}) into the Hub cache `cache` as one commit of `repo_id`, point
    the revisions `refs` at it, and return the commit (a sha1 of the contents, like a git commit id).

    huggingface_hub has no public function that writes its cache, so this writes the layout its file_download.py
    writes: each content once in `models--org--name/blobs/<etag>`; `snapshots/<commit>/<path>` a relative symlink
    to its blob (_create_symlink); `refs/<revision>` holding the commit hash with no newline
    (_cache_commit_hash_for_specific_revision). test_the_cache_is_laid_out_as_huggingface_hub_reads_it checks it
    with huggingface_hub's public readers."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    contents = {path: Path(source).read_bytes() for path, source in sorted(files.items())}
    commit = hashlib.sha1(json.dumps({p: hashlib.sha256(c).hexdigest() for p, c in contents.items()}).encode()).hexdigest()
    for path, content in contents.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()  # an LFS file's etag is its sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        pointer = storage / "snapshots" / commit / path
        pointer.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return commit


def adapter_files(folder: Path, under: str = "") -> dict:
    prefix = f"{under}/" if under else ""
    return {prefix + name: folder / name for name in ("adapter_config.json", "adapter_model.safetensors")}


def set_base(folder: Path, base: str) -> Path:
    """Name `base` as the adapter's base model (make_adapter names tiny-llama, which is no Hub id)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache with the Hub switched off: HF_HUB_CACHE / HF_HUB_OFFLINE for new processes, and the
    constants huggingface_hub read from them at import time for this one."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Adapters as their authors saved them, before any Hub: two versions of `math`, and `code` and `chat`."""
    root = tmp_path_factory.mktemp("sources")
    made = {
        "math-v1": make_adapter(root / "math-v1", seed=1, magnitude=0.05),
        "math-v2": make_adapter(root / "math-v2", seed=2, magnitude=0.3),
        "code": make_adapter(root / "code", seed=3, magnitude=0.1, r=2),
        "chat": make_adapter(root / "chat", seed=4, magnitude=0.2),
    }
    return {name: set_base(folder, "org/base") for name, folder in made.items()}


@pytest.fixture
def hub(hub_cache, sources, tmp_path, monkeypatch):
    """org/math (v1 tagged, main one commit later), org/multi (code/ and chat/ subfolders); cwd: an empty folder."""
    commits = {
        "math-v1": cache_repo(hub_cache, "org/math", adapter_files(sources["math-v1"]), refs=("v1",)),
        "math-main": cache_repo(hub_cache, "org/math", adapter_files(sources["math-v2"]), refs=("main",)),
        "multi": cache_repo(hub_cache, "org/multi", {**adapter_files(sources["code"], "code"), **adapter_files(sources["chat"], "chat")}),
    }
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return commits


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("org/name", HubRef("org/name")),
    ("org/name@v1.0", HubRef("org/name", "v1.0")),
    ("org/name@refs/pr/1", HubRef("org/name", "refs/pr/1")),
    ("org/name/sub", HubRef("org/name", None, "sub")),
    ("org/name/sub/deeper@0123456789abcdef0123456789abcdef01234567", HubRef("org/name", "0123456789abcdef0123456789abcdef01234567", "sub/deeper")),
    ("Org-1/my_model.v2", HubRef("Org-1/my_model.v2")),
    ("name", None),                  # no namespace: a local folder far more often than a legacy Hub id
    ("./org/name", None),
    ("/abs/org/name", None),
    ("org/name/", None),
    ("org//name", None),
    ("org/name@", None),
    ("org/name@a b", None),
    ("org/name/../x", None),
    ("org--x/name", None),           # huggingface_hub's validate_repo_id refuses "--" and ".."
    ("org/name.git", None),
    (" org/name", None),
])
def test_hub_references_parse_as_huggingface_hub_names_repositories(text, expected):
    assert parse(text) == expected
    if expected is not None:
        assert str(expected) == text


def test_the_cache_is_laid_out_as_huggingface_hub_reads_it(hub_cache, sources):
    from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache

    commit = cache_repo(hub_cache, "org/math", adapter_files(sources["math-v1"]), refs=("main", "v1"))
    (repo,) = scan_cache_dir(hub_cache).repos
    assert repo.repo_id == "org/math" and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main", "v1"})
    assert {f.file_name for f in revision.files} == {"adapter_config.json", "adapter_model.safetensors"}
    cached = try_to_load_from_cache("org/math", "adapter_model.safetensors", revision="v1")
    assert Path(cached).read_bytes() == (sources["math-v1"] / "adapter_model.safetensors").read_bytes()
    assert Path(snapshot_download("org/math", revision="v1")) == hub_cache / "models--org--math" / "snapshots" / commit


def test_merge_from_hub_revisions_and_subfolders_records_their_commits(hub, sources, tmp_path):
    local = set_base(make_adapter(Path("local"), seed=5, magnitude=0.15), "org/base")
    result = run("merge", "org/math@v1", "org/multi/code", "local", "-o", "merged", "--quiet")
    assert result.exit_code == 0, (result.stdout, result.stderr)

    record = json.loads(Path("merged/merge_record.json").read_text())
    math, code, mine = record["inputs"]
    assert math == {
        "name": "math@v1", "path": "org/math@v1",
        "hub": {"repo_id": "org/math", "revision": "v1", "commit": hub["math-v1"], "subfolder": None},
        "sha256": {"adapter_config.json": sha256(sources["math-v1"] / "adapter_config.json"),
                   "adapter_model.safetensors": sha256(sources["math-v1"] / "adapter_model.safetensors")},
    }  # v1's files, not main's
    assert code["hub"] == {"repo_id": "org/multi", "revision": None, "commit": hub["multi"], "subfolder": "code"}
    assert code["sha256"]["adapter_model.safetensors"] == sha256(sources["code"] / "adapter_model.safetensors")
    assert list(mine) == ["name", "path", "sha256"]  # a local input's entry is what it always was

    # the merge of the very files the record names
    direct = merge_adapters([str(sources["math-v1"]), str(sources["code"]), str(local)])
    direct.save_pretrained(tmp_path / "direct")
    written, expected = load_file("merged/adapter_model.safetensors"), load_file(tmp_path / "direct" / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all(written[k].equal(expected[k]) for k in written)

    card = Path("merged/README.md").read_text()
    metadata = front_matter(card)
    assert metadata["base_model"] == "org/base" and metadata["base_model_relation"] == "adapter"
    assert metadata["library_name"] == "peft"
    url = f"https://huggingface.co/org/multi/tree/{hub['multi']}/code"
    assert f"[`org/multi/code`]({url})" in card and f"https://huggingface.co/org/math/tree/{hub['math-v1']})" in card
    assert "`local`" in card

    # the recorded command reads the same commits again and writes the same bytes
    before = {p.name: p.read_bytes() for p in Path("merged").iterdir()}
    assert run(*record["command"][1:], "--force").exit_code == 0
    assert {p.name: p.read_bytes() for p in Path("merged").iterdir()} == before


def test_a_local_folder_wins_over_the_hub(hub, sources):
    shutil.copytree(sources["chat"], "org/math")  # a local folder spelled like the Hub repo that also exists
    result = run("merge", "org/math", "org/multi/code", "-o", "merged", "--quiet")
    assert result.exit_code == 0, result.stderr
    local, code = json.loads(Path("merged/merge_record.json").read_text())["inputs"]
    assert list(local) == ["name", "path", "sha256"]
    assert local["sha256"]["adapter_model.safetensors"] == sha256(sources["chat"] / "adapter_model.safetensors")
    assert "hub" in code
    assert read_adapter("org/math").source == "org/math"


def test_provenance_is_only_for_the_snapshot_of_the_reference(hub, hub_cache):
    snapshot = hub_cache / "models--org--multi" / "snapshots" / hub["multi"]
    assert provenance("org/multi/code", snapshot / "code")["commit"] == hub["multi"]
    assert provenance("org/multi/code", snapshot / "chat") is None
    assert provenance("org/multi", snapshot / "code") is None
    assert provenance("org/other/code", snapshot / "code") is None
    assert provenance("org/multi/code", Path("org/multi/code")) is None
    assert provenance("local", Path("local")) is None


@pytest.mark.parametrize("reference", ["org/multi/nope", "org/math@v9", "org/absent", "org/multi/code@v9"])
def test_a_reference_the_cache_cannot_resolve_offline_fails_in_one_line(hub, reference):
    with pytest.raises(NanPeftError, match=rf"^{reference}: no such folder, and fetching it from the Hub failed \(\w+\)$"):
        read_adapter(reference)
    result = run("merge", reference, "org/multi/chat", "-o", "merged")
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and len(lines) == 1
    assert lines[0].startswith(f"error: {reference}: no such folder, and fetching it from the Hub failed (")
    assert not Path("merged").exists()


def test_fold_into_a_hub_base_records_its_commit_and_writes_a_model_card(hub, hub_cache, sources, tmp_path):
    base = tmp_path / "base-source"
    tiny_llama().save_pretrained(base)
    (base / "README.md").write_text("---\nlicense: mit\n---\nThe base model's own card.\n")
    base_commit = cache_repo(hub_cache, "org/base", {p.name: p for p in base.iterdir()})

    result = run("merge", "org/math@v1", "org/multi/code", "-o", "full", "--fold-into", "org/base", "--quiet")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    record = json.loads(Path("full/merge_record.json").read_text())
    assert record["options"]["fold_into"] == "org/base"
    assert record["fold_into_hub"] == {"repo_id": "org/base", "revision": None, "commit": base_commit, "subfolder": None}

    merge_adapters([str(sources["math-v1"]), str(sources["code"])]).fold_into(base, tmp_path / "direct")
    assert Path("full/model.safetensors").read_bytes() == (tmp_path / "direct" / "model.safetensors").read_bytes()

    card = Path("full/README.md").read_text()
    metadata = front_matter(card)
    assert metadata["library_name"] == "transformers" and metadata["base_model_relation"] == "merge"
    assert metadata["base_model"] == ["org/base", "org/math", "org/multi"]  # the base, then the Hub adapters
    assert "pipeline_tag" not in metadata  # the Hub infers it from config.json for transformers models
    assert "The base model's own card." not in card
    assert f"[`org/base`](https://huggingface.co/org/base/tree/{base_commit})" in card
    assert 'AutoModelForCausalLM.from_pretrained("full")' in card
