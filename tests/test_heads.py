"""Adapters that carry task heads (modules_to_save): the LoRA bodies merge, every head is kept, none is averaged."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import BertConfig, BertForSequenceClassification

from nan_peft import NanPeftError, merge_adapters, read_adapter
from oracle import peft_deltas

LABELS = {"topic": 5, "sentiment": 2, "intent": 3}


def bert(num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)  # the same body for every label count; the classifier differs only in its rows
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def make_task_adapter(folder, labels, seed, magnitude, r=4, model=None, **lora):
    """A SEQ_CLS adapter on tiny BERT (or `model(labels)`): random LoRA factors and head."""
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=r, lora_alpha=8, target_modules=["query", "value"], **lora)
    build = model or bert
    model = get_peft_model(build(labels), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * magnitude)
    model.peft_config["default"].base_model_name_or_path = f"tiny-{build.__name__}"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {name: make_task_adapter(root / name, labels, seed, 0.05 * (seed + 1))
            for seed, (name, labels) in enumerate(LABELS.items())}


IDS = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(7))


def reference_logits(task_paths, result, task, labels):
    """Base BERT with W += sum_k c_k dW_k (peft's own dense updates) and the task's head copied in."""
    c = dict(zip(task_paths, result.coefficients.per_adapter.tolist()))
    plain = bert(labels)
    with torch.no_grad():
        for name, path in task_paths.items():  # each adapter in a model of its own label count
            for module, delta in peft_deltas(PeftModel.from_pretrained(bert(LABELS[name]), path, adapter_name=name)).items():
                weight = plain.get_submodule(module).weight
                weight += (c[name] * delta[name]).to(weight.dtype)
        if task is not None:
            head = read_adapter(task_paths[task]).saved
            plain.classifier.weight.copy_(head["base_model.model.classifier.weight"])
            plain.classifier.bias.copy_(head["base_model.model.classifier.bias"])
        return plain(IDS).logits


def test_reader_keeps_heads(tasks):
    adapter = read_adapter(tasks["topic"])
    assert adapter.saved_modules == ["classifier"]
    assert adapter.saved["base_model.model.classifier.weight"].shape == (5, 32)


def test_per_task_folders_load_with_their_heads(tasks, tmp_path):
    result = merge_adapters(list(tasks.values()))
    assert set(result.heads) == set(LABELS) and result.shared_saved == {}
    result.save_pretrained(tmp_path / "out", heads="per_task")
    for task, labels in LABELS.items():
        config = json.loads((tmp_path / "out" / task / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
        model = PeftModel.from_pretrained(bert(labels), tmp_path / "out", subfolder=task).eval()
        with torch.no_grad():
            ours = model(IDS).logits
        assert ours.shape == (3, labels)
        torch.testing.assert_close(ours, reference_logits(tasks, result, task, labels), rtol=1e-5, atol=1e-6)
        again = read_adapter(tmp_path / "out" / task)  # our own reader takes it back, heads included
        assert again.saved_modules == ["classifier"]
    # the root is the merged adapter alone, which every engine loads: no modules_to_save
    root = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert not root["modules_to_save"]
    model = PeftModel.from_pretrained(bert(2), tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference_logits(tasks, result, None, 2), rtol=1e-5, atol=1e-6)


def test_drop_warns_and_keep_needs_identical_heads(tasks, tmp_path):
    result = merge_adapters(list(tasks.values()))
    with pytest.warns(UserWarning, match=r"full modules \(classifier: modules_to_save\) that are left out"):
        result.save_pretrained(tmp_path / "dropped")
    assert sorted(p.name for p in (tmp_path / "dropped").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(NanPeftError, match="carry their own full modules"):
        result.save_pretrained(tmp_path / "kept", heads="keep")
    with pytest.raises(NanPeftError, match="unknown heads"):
        result.save_pretrained(tmp_path / "x", heads="average")


def test_identical_saved_modules_are_kept_once(tasks, tmp_path):
    """Two adapters with the same head (same key, same tensor): it is shared, not a per-task head."""
    import shutil

    twin = tmp_path / "twin"
    shutil.copytree(tasks["topic"], twin)
    other = make_task_adapter(tmp_path / "other", 5, seed=9, magnitude=0.2)
    from safetensors.torch import load_file, save_file

    state = load_file(other / "adapter_model.safetensors")
    head = read_adapter(twin).saved
    state.update(head)
    save_file(state, other / "adapter_model.safetensors")
    result = merge_adapters([twin, other])
    assert result.heads == {} and set(result.shared_saved) == set(head)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result.save_pretrained(tmp_path / "kept", heads="keep")
    kept = read_adapter(tmp_path / "kept")
    assert all(torch.equal(kept.saved[k], head[k]) for k in head)


def test_cli_and_recipe_write_what_python_writes(tasks, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nan_peft.cli import cli

    monkeypatch.chdir(tmp_path)
    paths = [str(p) for p in tasks.values()]
    merge_adapters(paths).save_pretrained(tmp_path / "py", heads="per_task")
    result = CliRunner().invoke(cli, ["merge", *paths, "-o", "cli", "--heads", "per-task", "--json"])
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["heads"]["mode"] == "per-task"
    assert document["heads"]["tasks"] == {t: ["base_model.model.classifier.bias", "base_model.model.classifier.weight"] for t in sorted(LABELS)}
    (tmp_path / "recipe.yaml").write_text("adapters: [" + ", ".join(paths) + "]\noutput: recipe\nheads: per-task\n")
    assert CliRunner().invoke(cli, ["merge", "--config", "recipe.yaml", "-q"]).exit_code == 0
    for folder in ("cli", "recipe"):
        for sub in ("", *LABELS):
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                assert (tmp_path / folder / sub / name).read_bytes() == (tmp_path / "py" / sub / name).read_bytes(), (folder, sub, name)
    dropped = CliRunner().invoke(cli, ["merge", *paths, "-o", "dropped"])
    assert "note: the sources carry full modules (classifier: modules_to_save)" in dropped.stderr
    assert not any(p.is_dir() for p in (tmp_path / "dropped").iterdir())


def roberta(num_labels: int):
    """RoBERTa's classification head has sub-layers (classifier.dense, classifier.out_proj)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)  # the same body for every label count
    config = RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=40, num_labels=num_labels)
    return RobertaForSequenceClassification(config).eval()


ROBERTA_LABELS = {"nli": 3, "polarity": 2}


@pytest.fixture(scope="module")
def roberta_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("roberta")
    return {name: make_task_adapter(root / name, labels, seed, 0.05 * (seed + 1), model=roberta, modules_to_save=["classifier"])
            for seed, (name, labels) in enumerate(ROBERTA_LABELS.items())}


def test_nested_head_is_read_as_the_configured_module(roberta_tasks, tmp_path):
    """peft saves classifier.dense.* / classifier.out_proj.*; they are one saved module, "classifier", and an
    adapter written back loads in peft with the same logits as the original."""
    adapter = read_adapter(roberta_tasks["nli"])
    assert adapter.saved_modules == ["classifier"]
    assert sorted(adapter.saved) == [f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("bias", "weight")]
    from nan_peft import write_adapter

    write_adapter(adapter, tmp_path / "again")
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    with torch.no_grad():
        original = PeftModel.from_pretrained(roberta(3), roberta_tasks["nli"]).eval()(IDS).logits
        again = PeftModel.from_pretrained(roberta(3), tmp_path / "again").eval()(IDS).logits
    torch.testing.assert_close(again, original, rtol=1e-5, atol=1e-6)


def test_nested_heads_per_task_load_in_peft(roberta_tasks, tmp_path):
    """Two RoBERTa adapters, each with its own nested head: every per-task folder loads in peft and gives the
    logits of base + sum_k c_k dW_k (peft's own updates) with that task's head (peft's own loaded copy)."""
    result = merge_adapters(list(roberta_tasks.values()))
    assert set(result.heads) == set(ROBERTA_LABELS)
    assert result.notices() and "(classifier: modules_to_save)" in result.notices()[0]
    result.save_pretrained(tmp_path / "out", heads="per_task")
    c = dict(zip(roberta_tasks, result.coefficients.per_adapter.tolist()))
    sources = {name: PeftModel.from_pretrained(roberta(ROBERTA_LABELS[name]), path, adapter_name=name).eval()
               for name, path in roberta_tasks.items()}
    for task, labels in ROBERTA_LABELS.items():
        config = json.loads((tmp_path / "out" / task / "adapter_config.json").read_text())
        assert config["modules_to_save"] == ["classifier"]
        expected = roberta(labels)
        with torch.no_grad():
            for name, model in sources.items():
                for module, delta in peft_deltas(model).items():
                    weight = expected.get_submodule(module).weight
                    weight += (c[name] * delta[name]).to(weight.dtype)
            head = sources[task].base_model.model.classifier.modules_to_save[task]
            expected.classifier.load_state_dict(head.state_dict())
            reference = expected(IDS).logits
            ours = PeftModel.from_pretrained(roberta(labels), tmp_path / "out", subfolder=task).eval()(IDS).logits
        assert ours.shape == (3, labels)
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
        assert read_adapter(tmp_path / "out" / task).saved_modules == ["classifier"]
