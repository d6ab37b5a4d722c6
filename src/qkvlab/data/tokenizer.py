"""Tokenisers for the text sources: one id per character, or byte-level BPE trained here.

Both have ``encode(str) -> list[int]``, ``decode(list[int]) -> str``, ``vocab_size`` and
``name``, plus ``encode_array`` (a whole corpus to a numpy array, fast).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qkvlab.cache import atomic_write_bytes
from qkvlab.errors import UserError

if TYPE_CHECKING:
    import tokenizers

__all__ = ["TOKENIZERS", "BPETokenizer", "CharTokenizer", "Tokenizer"]

#: Accepted ``tokenizer=`` values.
TOKENIZERS = ("char", "bpe")
#: Byte-level BPE starts from the 256 single-byte tokens; it needs room for a few merges on top.
MIN_BPE_VOCAB = 260


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of the corpus's characters."""

    name = "char"

    def __init__(self, corpus: str) -> None:
        self.chars = sorted(set(corpus))
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[c] for c in text]
        except KeyError as exc:
            raise UserError(
                f"character {exc.args[0]!r} is not in this char vocabulary ({self.vocab_size} characters of the corpus)"
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        """``encode`` for a whole corpus, through a code-point lookup table (one pass in numpy)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars), default=0) + 1, -1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)
        ids = table[np.minimum(codes, len(table) - 1)]
        if ((codes >= len(table)) | (ids < 0)).any():
            self.encode(text)  # raises the UserError that names the unknown character
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


def _chunks(text: str, size: int = 2048) -> Iterator[str]:
    """``text`` in pieces of about ``size`` characters, cut only where byte-level BPE cuts anyway.

    A piece ends at a lone newline between two non-space characters. The GPT-2 pre-tokeniser
    always makes that newline a token of its own (only a literal space joins the next word, and
    no whitespace run is involved), so encoding the pieces gives exactly the ids of encoding the
    whole text, while letting `tokenizers` work on them in parallel.
    """
    boundary = re.compile(r"(?<=\S)\n(?=\S)")
    start = 0
    while start < len(text):
        match = boundary.search(text, start + size)
        stop = match.end() if match else len(text)
        yield text[start:stop]
        start = stop


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained locally with HF ``tokenizers``.

    ``decode(encode(s)) == s`` for every string: the 256 bytes are all in the vocabulary and no
    prefix space is added.
    """

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size: int = tokenizer.get_vocab_size()

    @staticmethod
    def cache_path(cache_dir: Path, train_text: str, vocab_size: int) -> Path:
        digest = hashlib.sha256(train_text.encode("utf-8")).hexdigest()
        return cache_dir / "tokenizers" / f"bpe-{digest}-{vocab_size}.json"

    @classmethod
    def train_or_load(cls, train_text: str, vocab_size: int, cache_dir: Path) -> BPETokenizer:
        """Trained on ``train_text`` (the training split only), cached per (sha256 of it, vocab_size).

        A fresh training run is saved first and then loaded back from the JSON, so a cache hit
        and a miss go through the same loaded tokenizer and give identical ids.
        """
        if vocab_size < MIN_BPE_VOCAB:
            raise UserError(
                f"vocab_size={vocab_size} is too small for byte-level BPE; accepted: >= {MIN_BPE_VOCAB} "
                "(it must exceed the 256-byte alphabet)"
            )
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        path = cls.cache_path(cache_dir, train_text, vocab_size)
        if not path.is_file():
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tokenizer = Tokenizer(models.BPE())
            tokenizer.pre_tokenizer = byte_level
            tokenizer.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                min_frequency=2,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                special_tokens=[],
                show_progress=False,
            )
            tokenizer.train_from_iterator(_chunks(train_text), trainer=trainer)
            atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"))
        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        # Short pieces encode several times faster than long ones; `encode_batch_fast` (newer releases) skips offsets.
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode_batch(list(_chunks(text)))
        ids = itertools.chain.from_iterable(e.ids for e in encodings)
        return np.fromiter(ids, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids))


Tokenizer = CharTokenizer | BPETokenizer
