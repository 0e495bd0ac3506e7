"""Characters <-> ids: the vocabulary an exported model carries in its metadata.

Pure Python and NumPy. Both sides read it: training builds it from the corpus,
the server decodes it from the model file; neither reaches into the other.
"""

from __future__ import annotations

import json

import numpy as np

UNK = "\ufffd"  # id 0: any character the vocabulary lacks


class Vocabulary:
    """Characters <-> ids. Id 0 is the unknown character."""

    def __init__(self, chars: list[str]):
        if not chars or chars[0] != UNK:
            chars = [UNK] + [c for c in chars if c != UNK]
        self.chars = chars
        self._index = {c: i for i, c in enumerate(chars)}
        # id by code point, -1 where unknown: encoding is one vectorised lookup (the server's hot path)
        single = [(ord(c), i) for c, i in self._index.items() if len(c) == 1]
        self._table = np.full(max((cp for cp, _ in single), default=0) + 1, -1, np.int32)
        for cp, i in single:
            self._table[cp] = i

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids; unknown characters map to 0."""
        return self.encode_counting(text)[0]

    def _raw(self, text: str) -> np.ndarray:
        """int32 ids, -1 where the vocabulary lacks the character."""
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        table = self._table
        inside = cps < len(table)
        raw = table[np.where(inside, cps, 0)]
        raw[~inside] = -1
        return raw

    def encode_counting(self, text: str) -> tuple[np.ndarray, int]:
        """(ids, how many characters were not in the vocabulary)."""
        raw = self._raw(text)
        unknown = raw < 0
        raw[unknown] = 0
        return raw, int(np.count_nonzero(unknown))

    def encode_rows(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Several non-empty texts at once (a batch of the server's): their ids, concatenated, and per text how
        many of its characters the vocabulary lacks. One vectorised lookup for all of them."""
        raw = self._raw("".join(texts))
        unknown = raw < 0
        raw[unknown] = 0
        starts = np.cumsum([0, *(len(t) for t in texts[:-1])])
        return raw, np.add.reduceat(unknown, starts, dtype=np.int64)

    def unknown_chars(self, text: str) -> set[str]:
        return {ch for ch in set(text) if ch not in self._index}

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps(self.chars, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Vocabulary:
        return cls(json.loads(s))
