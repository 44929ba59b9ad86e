"""Consecutive rows of one checkpoint, as the output asks for them: vectors, which are articles, dicts or JSON lines.

A block from a ``.pkl`` holds its rows as dicts; one from a ``.jsonl``
keeps its lines unread until asked for, and parses them only as dicts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from ..errors import CheckpointError
from .jsonl_index import parse_jsonl_row
from .rows import article_mask, python_scalar


class RowBlock(ABC):
    """Consecutive rows of one checkpoint: their vectors, which are articles, and their rows."""

    def __init__(self, embeddings: np.ndarray, keep: np.ndarray):
        self.embeddings = embeddings
        self.keep = keep

    @abstractmethod
    def article_rows(self) -> list[dict]:
        """The article rows as dicts."""

    @abstractmethod
    def article_lines(self) -> list[bytes]:
        """The article rows as JSON lines."""


# Non-string keys become strings, as the json module writes them.
_JSON_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class DictRowBlock(RowBlock):
    """Rows that were loaded as dicts (legacy pickles); ``keep`` if already known, else from the rows.

    ``first_row`` is the index of the first row in the article list of
    ``path``, the checkpoint named in errors.
    """

    def __init__(self, embeddings: np.ndarray, rows: list[dict], keep: np.ndarray | None = None,
                 path: Path | None = None, first_row: int = 0):
        super().__init__(embeddings, article_mask(rows) if keep is None else keep)
        self._rows = rows
        self._path = path
        self._first_row = first_row

    def article_rows(self) -> list[dict]:
        return [row for row, kept in zip(self._rows, self.keep) if kept]

    def article_lines(self) -> list[bytes]:
        """The article rows as strict JSON: numpy scalars as their Python value, NaN and Infinity as null.

        A value that JSON cannot hold (bytes, a string with a lone
        surrogate, an integer beyond 64 bits...) is a :class:`CheckpointError`
        naming the checkpoint and the row.
        """
        lines = []
        for offset in np.flatnonzero(self.keep).tolist():
            try:
                lines.append(orjson.dumps(self._rows[offset], default=python_scalar, option=_JSON_LINE))
            except orjson.JSONEncodeError as exc:
                raise CheckpointError(
                    str(self._path),
                    f"articles[{self._first_row + offset}] cannot be written as JSON ({exc}); "
                    f"a .pkl output keeps any value that a checkpoint holds.",
                ) from exc
        return lines


class JsonLineRowBlock(RowBlock):
    """Rows still in their JSON lines (``.jsonl``): read only if asked for, parsed only as dicts.

    ``read_text`` returns the block's lines back to back; ``line_ends`` is
    the end of each line in them.
    """

    def __init__(self, embeddings: np.ndarray, keep: np.ndarray, read_text: Callable[[], bytes],
                 line_ends: np.ndarray, first_line: int, path: Path):
        super().__init__(embeddings, keep)
        self._read_text = read_text
        self._text: bytes | None = None
        self._line_ends = line_ends
        self._first_line = first_line
        self._path = path

    def _line(self, offset: int) -> bytes:
        # Read only when asked: a bundle copies the lines in the kernel instead.
        if self._text is None:
            self._text = self._read_text()
        start = int(self._line_ends[offset - 1]) if offset else 0
        return self._text[start : int(self._line_ends[offset])]

    def article_rows(self) -> list[dict]:
        return [
            parse_jsonl_row(self._line(offset), self._first_line + offset, self._path)
            for offset in np.flatnonzero(self.keep).tolist()
        ]

    def article_lines(self) -> list[bytes]:
        lines = [self._line(offset) for offset in np.flatnonzero(self.keep).tolist()]
        return [line if line.endswith(b"\n") else line + b"\n" for line in lines]

