"""Text sources (``text:PATH``, ``hf:NAME[:CONFIG]``) and the language-modelling dataset.

A text is split by position before tokenisation: the first (1 − val_fraction) of its characters
are the training split, the rest validation. Each split is tokenised separately and cut into
non-overlapping windows of seq_len + 1 tokens, starting at its first token; a window gives
``input_ids`` (its first seq_len tokens) and ``labels`` (its last seq_len, the next tokens).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qkvlab.data.base import FiniteDataset
from qkvlab.data.tokenizer import TOKENIZERS, BPETokenizer, CharTokenizer, Tokenizer
from qkvlab.errors import UserError

__all__ = ["LMDataset", "build_lm_dataset", "hf_text", "read_text_path"]


def _join(texts: list[str]) -> str:
    """Concatenate documents, each ending in a newline so that none runs into the next."""
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


def read_text_path(path: str | Path) -> str:
    """A UTF-8 text file, or every ``*.txt`` under a folder (recursive, sorted by relative path)."""
    spec = f"text:{path}"
    root = Path(path).expanduser()
    if not str(path) or not root.exists():
        raise UserError(
            f"{spec}: no such file or folder; accepted: a UTF-8 text file or a folder of .txt files"
        )
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            (p for p in root.rglob("*.txt") if p.is_file()), key=lambda p: p.relative_to(root).as_posix()
        )
        if not files:
            raise UserError(
                f"{spec}: the folder holds no .txt files; accepted: a UTF-8 text file or a folder of .txt files"
            )
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise UserError(f"{spec}: {file} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    text = texts[0] if len(texts) == 1 else _join(texts)
    if not text.strip():
        raise UserError(f"{spec} is empty; accepted: a file or folder with some text")
    return text


def hf_text(name: str, config: str | None = None) -> str:
    """The ``text`` column of the train split of a Hugging Face dataset (needs ``datasets`` and a network)."""
    spec = f"hf:{name}" + (f":{config}" if config else "")
    if not name:
        raise UserError(f"{spec!r}: no dataset name; accepted: hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{spec} needs the Hugging Face `datasets` package: pip install datasets") from None
    try:
        data = datasets.load_dataset(name, config, split="train")
    except Exception as exc:  # network, missing dataset or config: all the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{spec}: could not load the train split ({type(exc).__name__}: {reason})") from None
    if "text" not in data.column_names:
        raise UserError(f"{spec} has no 'text' column; its columns: {', '.join(data.column_names)}")
    text = _join([t for t in data["text"] if t])
    if not text.strip():
        raise UserError(f"{spec}: the train split's text column is empty")
    return text


class LMDataset(FiniteDataset):
    """Next-token prediction on one text. Samples are windows; see the module docstring."""

    kind = "lm"

    def __init__(
        self,
        train_ids: np.ndarray,
        val_ids: np.ndarray,
        *,
        seq_len: int,
        tokenizer: Tokenizer,
        seed: int,
        name: str = "text",
    ) -> None:
        super().__init__()
        if seq_len < 1:
            raise UserError(f"seq_len={seq_len}; accepted: an integer >= 1")
        window = seq_len + 1
        for split, ids in (("validation", val_ids), ("training", train_ids)):
            if len(ids) < window:
                raise UserError(
                    f"seq_len={seq_len} is too long for the {split} split of {name}, which has {len(ids)} "
                    f"{tokenizer.name} tokens; accepted: seq_len <= {max(len(ids) - 1, 0)} "
                    "(or more text, or a larger val_fraction)"
                )
        self.seq_len, self.tokenizer, self.seed = seq_len, tokenizer, seed
        # int32 halves the memory of a large corpus; batches come out as int64 (torch's index type).
        self.train_ids = torch.from_numpy(train_ids.astype(np.int32))
        self.val_ids = torch.from_numpy(val_ids.astype(np.int32))
        self.n_train, self.n_val = len(train_ids) // window, len(val_ids) // window
        self.train_windows = self.train_ids[: self.n_train * window].view(self.n_train, window)
        self.val_windows = self.val_ids[: self.n_val * window].view(self.n_val, window)
        self.info = {
            "vocab_size": tokenizer.vocab_size,
            "seq_len": seq_len,
            "n_train_tokens": len(train_ids),
            "n_val_tokens": len(val_ids),
        }

    @staticmethod
    def _pairs(windows: torch.Tensor) -> dict[str, torch.Tensor]:
        windows = windows.long()
        return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}

    def _train_samples(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._pairs(self.train_windows.index_select(0, indices))

    def _val_samples(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return self._pairs(self.val_windows[start:stop])


def build_lm_dataset(
    text: str,
    *,
    name: str,
    seq_len: int,
    tokenizer: str,
    vocab_size: int,
    seed: int,
    val_fraction: float,
    cache_dir: Path,
) -> LMDataset:
    """Split ``text`` by position, build the tokeniser, tokenise each split, window it."""
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if tokenizer == "char":
        tok: Tokenizer = CharTokenizer(text)  # the whole corpus, so that validation text always encodes
    elif tokenizer == "bpe":
        tok = BPETokenizer.train_or_load(train_text, vocab_size, cache_dir)
    else:
        raise UserError(f"unknown tokenizer {tokenizer!r}; accepted: {', '.join(TOKENIZERS)}")
    return LMDataset(
        tok.encode_array(train_text),
        tok.encode_array(val_text),
        seq_len=seq_len,
        tokenizer=tok,
        seed=seed,
        name=name,
    )
