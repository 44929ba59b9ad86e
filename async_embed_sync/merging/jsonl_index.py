"""The lines of a ``.jsonl`` article file: where each ends, which are not articles, and their strict parse.

Every line is parsed before a merge publishes anything: :func:`index_jsonl`
parses only the lines it cannot count unparsed, the others are parsed where
they are read as dicts, or by :func:`parse_jsonl_span` in the article worker.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson

from ..errors import CheckpointError
from .rows import is_article

# The key "kind", each letter possibly escaped: a line without a match has no
# "kind" key, so it is an article and need not be parsed again to be kept.
_KIND_KEY = re.compile(rb'"(?:k|\\u006[bB])(?:i|\\u0069)(?:n|\\u006[eE])(?:d|\\u0064)"')


def parse_jsonl_row(line: bytes, number: int, path: Path) -> dict:
    # orjson: about 4x the speed of ``json`` on article rows, and strict
    # (UTF-8 only, no NaN or Infinity literals, which are not JSON).
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(str(path), f"line {number} is not JSON ({exc}).") from exc
    if not isinstance(row, dict):
        raise CheckpointError(str(path), f"line {number} is not a JSON object.")
    return row



# The ``.jsonl`` of a checkpoint is read this much at a time when it is indexed.
_JSONL_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class JsonlIndex:
    """Where each line of a ``.jsonl`` file ends, and which rows are not articles.

    Built without parsing the lines that need no parsing to be counted: a
    line whose bytes hold no ``"kind"`` key (however escaped) is an article,
    and a line that starts with ``{`` and ends with ``}`` is taken to be a
    JSON object. Every other line is parsed here, and refused if it is not a
    JSON object. The lines taken on trust are still parsed before a merge
    publishes anything: where the row is read as a dict (a ``.pkl``
    output), or by :func:`parse_jsonl_span` in the article worker process
    (a bundle's articles).
    """

    line_ends: np.ndarray  # int64: the offset just after each line, its newline included
    dropped: np.ndarray  # int64: the rows that are not articles, ascending

    @property
    def rows(self) -> int:
        return len(self.line_ends)

    def line_start(self, row: int) -> int:
        return int(self.line_ends[row - 1]) if row else 0


def _line_ends(text: bytes, size: int) -> list[int]:
    """Where each line of ``text[:size]`` ends; the last one may lack its newline."""
    # bytes.find is a memchr: faster here than numpy's compare and nonzero.
    ends, find, at = [], text.find, text.find(b"\n", 0, size)
    while at >= 0:
        ends.append(at + 1)
        at = find(b"\n", at + 1, size)
    if size and (not ends or ends[-1] != size):
        ends.append(size)
    return ends


def _rows_needing_a_parse(text: bytes, ends: np.ndarray) -> set[int]:
    """Rows of ``text[:ends[-1]]`` that may carry a ``kind`` key, or may not be a JSON object."""
    data = np.frombuffer(text, dtype=np.uint8, count=int(ends[-1]))
    starts = np.concatenate(([0], ends[:-1]))
    last = ends - 1 - (data[ends - 1] == ord("\n"))  # the last byte before the newline
    filled = last >= starts
    looks_like_object = np.zeros(len(ends), dtype=bool)
    looks_like_object[filled] = (data[starts[filled]] == ord("{")) & (data[last[filled]] == ord("}"))
    rows = set(np.flatnonzero(~looks_like_object).tolist())
    for match in _KIND_KEY.finditer(text, 0, int(ends[-1])):
        rows.add(int(np.searchsorted(ends, match.start(), side="right")))
    return rows


def _whole_line_chunks(
    stream: BinaryIO, limit: int | None = None, chunk_bytes: int = _JSONL_CHUNK_BYTES
) -> Iterator[tuple[bytes, int]]:
    """``(text, cut)`` pairs: ``text[:cut]`` is the next run of whole lines of ``stream``.

    Reads ``chunk_bytes`` at a time, at most ``limit`` bytes if given; the
    very last line may lack its newline.
    """
    carry = b""
    remaining = math.inf if limit is None else limit
    while True:
        chunk = stream.read(min(chunk_bytes, remaining)) if remaining else b""
        remaining -= len(chunk)
        text = carry + chunk if carry else chunk
        # Whole lines only; a partial last line waits for the next chunk.
        cut = text.rfind(b"\n") + 1 if chunk else len(text)
        carry = text[cut:]
        if cut:
            yield text, cut
        if not chunk:
            return


def index_jsonl(stream: BinaryIO, path: Path) -> JsonlIndex:
    """Index the lines of ``stream``; :class:`CheckpointError` for a line that is not a JSON object."""
    line_ends: list[np.ndarray] = []
    dropped: list[int] = []
    base = rows = 0
    for text, cut in _whole_line_chunks(stream):
        ends = np.array(_line_ends(text, cut), dtype=np.int64)
        for offset in sorted(_rows_needing_a_parse(text, ends)):
            start = int(ends[offset - 1]) if offset else 0
            row = parse_jsonl_row(text[start : int(ends[offset])], rows + offset + 1, path)
            if not is_article(row):
                dropped.append(rows + offset)
        line_ends.append(ends + base)
        base += cut
        rows += len(ends)
    return JsonlIndex(
        line_ends=np.concatenate(line_ends) if line_ends else np.zeros(0, np.int64),
        dropped=np.array(dropped, dtype=np.int64),
    )


# Spans are parsed this much at a time: the parser runs in a worker process
# (see ``merging/article_worker.py``) whose resident size adds to the merge's, and
# larger reads parse no faster.
_PARSE_CHUNK_BYTES = 1 << 20


def parse_jsonl_span(path: Path, offset: int, length: int, first_line: int, source: Path | None = None) -> Iterator[list[dict]]:
    """The rows of the whole lines in ``length`` bytes of ``path`` from ``offset``, a list per chunk read.

    Every line is parsed: :class:`CheckpointError` naming ``source``
    (default ``path``) and the line (numbered from ``first_line``) for a
    line that is not a JSON object, or if the file is shorter than the span.
    """
    source = source or path
    number = first_line
    parsed = 0
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            for text, cut in _whole_line_chunks(stream, length, _PARSE_CHUNK_BYTES):
                view, start, rows = memoryview(text), 0, []
                for end in _line_ends(text, cut):
                    rows.append(parse_jsonl_row(view[start:end], number, source))
                    number += 1
                    start = end
                parsed += cut
                yield rows
    except OSError as exc:
        raise CheckpointError.unreadable(exc, path, source) from exc
    if parsed != length:
        raise CheckpointError(str(source), "the file shrank while it was read.")

