"""Which examples each seed of experiment 2 trains, validates and tests on, and the check that no held-out example is
trained on; the tasks' examples tokenised (real text by MiniLM's tokenizer, or toy tasks for the tiny model)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .lora_tasks import Setup


class Leak(AssertionError):
    pass


def check_no_leak(plan: dict, keys: dict) -> None:
    """Raise Leak if a test example's key (its text, its token ids: anything the model could see twice) is also
    the key of an example that some seed trains on (a task's training sample or a volume adapter's)."""
    for task, entry in plan.items():
        for view in keys.get(task, ()):
            test = {view[i] for i in entry["test"] + entry.get("val", [])}
            trained = [i for idx in entry["train"].values() for i in idx]
            trained += [i for parts in entry.get("volume", {}).values() for part in parts for i in part]
            shared = test.intersection(view[i] for i in trained)
            if shared:
                raise Leak(f"task {task}: {len(shared)} test example(s) also in the training data, e.g. {next(iter(shared))!r:.80}")


def splits(setup: Setup, labels: dict, keys: dict | None = None) -> dict:
    """Per task: a fixed test set and, per seed, a training sample of the task's size from the rest; for the
    volume task also, per seed, disjoint samples of volume_sizes ("volume" entry).

    keys: {task: [view, ...]}, each view a list with one hashable key per example (texts, token ids); every
    view is checked: no test example may share its key with a training example (check_no_leak)."""
    out = {}
    for task, y in labels.items():
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000)).tolist()
        test, val, pool = order[:setup.test_size], order[setup.test_size:setup.test_size + setup.val_size], order[setup.test_size + setup.val_size:]
        needed = max(setup.train_sizes[task], sum(setup.volume_sizes) if task == setup.volume_task else 0)
        if needed > len(pool):
            raise ValueError(f"task {task}: {needed} training examples asked for, {len(pool)} available")
        train, volume = {}, {}
        for seed in setup.seeds:
            pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed * 7919 + 17)).tolist()
            train[seed] = [pool[i] for i in pick[:setup.train_sizes[task]]]
            ends = torch.tensor((0, *setup.volume_sizes)).cumsum(0).tolist()
            volume[seed] = [[pool[i] for i in pick[a:b]] for a, b in zip(ends, ends[1:])]
        out[task] = {"test": test, "val": val, "train": train}
        if task == setup.volume_task:
            out[task]["volume"] = volume
    check_no_leak(out, keys or {})
    return out


def encode_real(setup: Setup) -> tuple[dict, dict]:
    """{task: (ids, mask, labels, class names)} for the real tasks, tokenised by MiniLM's tokenizer, and
    {task: [texts, token ids]} for the leak check.

    The loaders already drop duplicate texts. Inputs cut to max_length tokens can still coincide (18 BBC
    articles are re-edited versions of another whose first 64 tokens are the same): the model cannot tell
    those apart, so all but the first of each are dropped too."""
    from transformers import AutoTokenizer

    from .data import LOADERS, minilm_dir, normalise

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    encoded, keys = {}, {}
    for task in setup.train_sizes:
        texts, labels, names = LOADERS[task]()
        batch = tokenizer(texts, truncation=True, max_length=setup.max_length, padding="max_length", return_tensors="pt")
        tokens = [tuple(row) for row in batch["input_ids"].tolist()]
        first = {}
        for i, t in enumerate(tokens):
            first.setdefault(t, i)
        keep = sorted(first.values())
        encoded[task] = (batch["input_ids"][keep], batch["attention_mask"][keep], torch.tensor(labels)[keep], names)
        keys[task] = [[normalise(texts[i]) for i in keep], [tokens[i] for i in keep]]
    return encoded, keys


def encode_synthetic(setup: Setup, examples: int = 160, length: int = 12) -> dict:
    """Toy tasks for the tiny random model: the class is the group of marker tokens planted in noise."""
    encoded = {}
    for t, task in enumerate(setup.train_sizes):
        g = torch.Generator().manual_seed(t)
        classes = 2 + t % 2
        y = torch.randint(0, classes, (examples,), generator=g)
        ids = torch.randint(20, 64, (examples, length), generator=g)
        markers = 2 + t * 6 + 2 * y  # task t uses tokens 2 + 6t .. 7 + 6t
        ids[:, 1] = markers
        ids[:, 3] = markers + 1
        ids[:, 0] = 1
        mask = torch.ones_like(ids)
        encoded[task] = (ids, mask, y, [f"c{c}" for c in range(classes)])
    return encoded, {task: [[tuple(row) for row in e[0].tolist()]] for task, e in encoded.items()}
