"""The model card's metadata follows the Hub's rules: `base_model` only names Hub ids (a local path goes in the
text), `base_model_relation` adapter for a merged adapter and merge for a folded model, `library_name` peft or
transformers, `pipeline_tag` from the adapters' task type. Cards are read back with huggingface_hub's own parser."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from models import make_adapter, tiny_llama
from nan_peft.cli import cli
from nan_peft.reader import TASK_TYPES
from nan_peft.record import PIPELINE_TAGS, card_metadata

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # peft: "Could not find a config file in tiny-llama"

# The Hub's pipeline tags (huggingface.js packages/tasks/src/pipelines.ts, PIPELINE_DATA) that peft's tasks map to.
HUB_PIPELINE_TAGS = {
    "text-generation", "text2text-generation", "text-classification", "token-classification", "question-answering",
    "feature-extraction", "fill-mask", "sentence-similarity", "summarization", "translation",
}


def with_config(folder: Path, **fields) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("card")
    tiny_llama().save_pretrained(root / "base")
    return root, [make_adapter(root / f"a{k}", seed=k, magnitude=0.1 * k, task_type="CAUSAL_LM") for k in (1, 2)]


@pytest.fixture
def adapters(made, tmp_path, monkeypatch):
    """Two CAUSAL_LM adapters copied into an empty working folder; returns a function that names their base."""
    import shutil

    root, sources = made
    monkeypatch.chdir(tmp_path)
    copies = [Path(shutil.copytree(source, tmp_path / source.name)) for source in sources]

    def based_on(base):
        return [str(with_config(copy, base_model_name_or_path=base).relative_to(tmp_path)) for copy in copies]

    return based_on


def merge(*args):
    result = CliRunner().invoke(cli, ["merge", *map(str, args), "--quiet"])
    assert result.exit_code == 0, (result.stdout, result.stderr)


def metadata_of(folder) -> dict:
    """The card's metadata as huggingface_hub reads it (and as plain YAML: both must agree)."""
    from huggingface_hub import ModelCard, metadata_load

    card = Path(folder, "README.md")
    loaded = metadata_load(card)
    assert loaded == yaml.safe_load(card.read_text().split("---\n")[1])
    assert ModelCard.load(card).data.to_dict() == loaded  # ModelCardData takes it as it is
    return loaded


# ---------------------------------------------------------------------------------------------------------


def test_every_peft_task_type_has_a_hub_pipeline_tag():
    assert set(PIPELINE_TAGS) == set(TASK_TYPES)
    assert set(PIPELINE_TAGS.values()) <= HUB_PIPELINE_TAGS
    for task, tag in [*PIPELINE_TAGS.items(), (None, None)]:
        stub = types.SimpleNamespace(adapter=types.SimpleNamespace(config={"task_type": task}, base_model="org/base"))
        metadata = card_metadata(stub, {"options": {}, "inputs": []})
        assert metadata["pipeline_tag"] == tag and metadata["library_name"] == "peft"


def test_an_adapter_on_a_hub_base_is_declared_as_its_adapter(adapters):
    merge(*adapters("org/base-model"), "-o", "out")
    assert metadata_of("out") == {
        "base_model": "org/base-model",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["lora", "nan-peft", "merge", "base_model:adapter:org/base-model"],
        "base_model_relation": "adapter",
    }
    card = Path("out/README.md").read_text()
    assert "[`org/base-model`](https://huggingface.co/org/base-model)" in card
    assert 'AutoModelForCausalLM.from_pretrained("org/base-model")' in card


@pytest.mark.parametrize("base", ["LOCAL_FOLDER", "models/llama", "./models/llama", "/data/models/llama-7b", "~/llama", "tiny-llama"])
def test_a_base_model_that_is_no_hub_id_stays_out_of_the_metadata(adapters, tmp_path, base):
    if base == "LOCAL_FOLDER":
        base = str(tmp_path / "base-copy")
    Path(tmp_path / "base-copy").mkdir()
    Path(tmp_path / "models" / "llama").mkdir(parents=True)  # "models/llama" reads like org/name but is a folder here
    merge(*adapters(base), "-o", "out")
    metadata = metadata_of("out")
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "text-generation"
    assert f"Base model: `{base}` (not a Hub model id" in Path("out/README.md").read_text()


def test_a_folded_model_gets_a_transformers_card(adapters, made):
    root, _ = made
    merge(*adapters("org/base-model"), "-o", "full", "--fold-into", root / "base")
    assert metadata_of("full") == {
        "base_model": "org/base-model",  # the adapters' base; the local folder folded into is named in the text
        "library_name": "transformers",
        "tags": ["nan-peft", "merge"],
        "base_model_relation": "merge",
    }
    card = Path("full/README.md").read_text()
    assert f"the base model `{root / 'base'}` with the merged update of 2 LoRA adapters" in card
    assert 'AutoModelForCausalLM.from_pretrained("full")' in card and "PeftModel" not in card
    record = json.loads(Path("full/merge_record.json").read_text())
    assert "fold_into_hub" not in record and all("hub" not in entry for entry in record["inputs"])


def test_a_folded_model_of_a_local_base_names_no_base_model(adapters, made):
    root, _ = made
    merge(*adapters("tiny-llama"), "-o", "full", "--fold-into", root / "base")
    metadata = metadata_of("full")
    assert metadata == {"library_name": "transformers", "tags": ["nan-peft", "merge"]}


def test_writing_the_card_metadata_imports_neither_peft_nor_transformers():
    code = (
        "import sys\n"
        "from nan_peft import hub, record\n"
        "record.front_matter({'base_model': 'org/x', 'library_name': 'peft', 'tags': ['a'], 'base_model_relation': 'adapter'})\n"
        "assert hub.parse('org/x/sub@v1') and hub.model_id('org/x') == 'org/x'\n"
        "print(sorted(m for m in ('peft', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
