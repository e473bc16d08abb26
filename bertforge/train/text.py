"""Corpus text: documents of a packaged corpus, a text file or a folder of them, cut into sentences.

Corpus format. A source is the packaged news corpus (`source=None`), a text file, or a folder whose `*.txt` files
(recursively, in sorted path order) are read. Every file is UTF-8, and documents inside a file are separated by one
or more blank lines (the format of BERT's create_pretraining_data.py); a file without blank lines is one document.
Inside a document each line is a paragraph, cut into sentences after `.`, `!` or `?` (plus closing quotes or
brackets) followed by whitespace and a capital letter, digit or opening quote, except for a `.` after a single
capital (initials, "U.S.") or a few title abbreviations ("Mr.", "Sen.", ...). The rule is simple on purpose:
sentences only decide where an A/B pair may be cut, so an occasional wrong cut costs nothing.
"""

import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path

from bertforge.train import corpus

_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "Prof", "Sen", "Rep", "Gov", "Gen", "Lt", "Col", "St", "Jr", "Sr", "vs")
SENTENCE_END = re.compile(
    r"((?:[!?]|(?<!\b[A-Z])" + "".join(rf"(?<!\b{a})" for a in _ABBREVIATIONS) + r"\.)"
    + r"[.!?]*[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)
BLANK_LINES = re.compile(r"\n[ \t]*\n")


class CorpusError(ValueError):
    """A corpus that cannot be read: missing, empty, too small to split, or not UTF-8."""


# ---------------------------------------------------------------------------------------------------------------
# Text


def split_sentences(document: str) -> list[str]:
    """Sentences of a document: its lines, each cut after sentence punctuation (rule in the module docstring)."""
    pieces = (SENTENCE_END.sub("\\1\n", line).split("\n") for line in document.splitlines())
    return [s.strip() for s in itertools.chain.from_iterable(pieces) if s.strip()]


def corpus_files(source: str | os.PathLike) -> list[Path]:
    path = Path(source)
    if not path.exists():
        raise CorpusError(f"corpus path does not exist: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise CorpusError(f"corpus is empty: no .txt files under {path}")
    return files


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise CorpusError(f"corpus file {path} is not UTF-8: byte 0x{data[offset]:02x} at offset {offset} "
                          f"(line {line}) ({e.reason}); convert it, e.g. iconv -f latin1 -t utf-8") from None


def read_documents(source: str | os.PathLike | None = None) -> Iterator[str]:
    """Documents of a corpus: the packaged news articles (None), or the blank-line-separated blocks of a .txt file
    or of every .txt file under a folder."""
    if source is None:
        yield from corpus.news_articles()
        return
    for path in corpus_files(source):
        text = "\n".join(_read_utf8(path).splitlines())
        yield from (doc.strip() for doc in BLANK_LINES.split(text) if doc.strip())
