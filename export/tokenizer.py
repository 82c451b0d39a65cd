"""CLIP's byte-level BPE tokenizer without PyTorch, for serving with ONNX Runtime.

Produces exactly what open_clip's ``SimpleTokenizer`` (clean="lower") produces — the token ids
the model was trained with — from the same merge file, which ``export_onnx`` copies next to
the graphs. Needs ``regex`` and ``ftfy`` (both small and pure Python), and numpy.
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np

N_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses, after the byte symbols
_SPECIAL = ("<start_of_text>", "<end_of_text>")


@lru_cache()
def _byte_symbols() -> Dict[int, str]:
    """Each byte as a printable character (bytes that are already printable map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes, then the rest) is the vocabulary's order


class BPETokenizer:
    """``tokenizer(["a lake", ...]) -> int64 array (N, context_length)``, padded with zeros."""

    def __init__(self, vocab_path: str, context_length: int = 77):
        import regex

        lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")[1:N_MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):  # cut short or another file: other ids
            raise ValueError(f"{vocab_path} is not CLIP's BPE merge file ({N_MERGES} merges of two symbols)")
        symbols = list(_byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + list(_SPECIAL)
        self.ids = {tok: i for i, tok in enumerate(vocab)}
        self.ranks: Dict[Tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.ids[_SPECIAL[0]], self.ids[_SPECIAL[1]]
        self.context_length = context_length
        self._cache: Dict[str, List[str]] = {}
        self._split = regex.compile("|".join(_SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                    regex.IGNORECASE)

    @staticmethod
    def clean(text: str) -> str:
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return " ".join(text.split()).lower()

    def _merge(self, word: str) -> List[str]:
        """Apply the merges in rank order, each to every non-overlapping occurrence, left to right."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, N_MERGES), p) for p in zip(parts, parts[1:]))
            if rank == N_MERGES:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = parts
        return parts

    def encode(self, text: str) -> List[int]:
        byte_symbol = _byte_symbols()
        out: List[int] = []
        for piece in self._split.findall(self.clean(text)):
            if piece in _SPECIAL:
                out.append(self.ids[piece])
                continue
            word = "".join(byte_symbol[b] for b in piece.encode("utf-8"))
            out.extend(self.ids[p] for p in self._merge(word))
        return out

    def fit(self, text: str) -> Tuple[int, int]:
        """(tokens of ``text``, tokens the encoder reads of a text): start and end of text take two."""
        return len(self.encode(text)), self.context_length - 2

    def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            tokens = [self.sot] + self.encode(text) + [self.eot]
            if len(tokens) > self.context_length:  # truncate, keeping the end-of-text token last
                tokens = tokens[:self.context_length]
                tokens[-1] = self.eot
            result[row, :len(tokens)] = tokens
        return result
