"""Where legacy checkpoints' bytes wait, in the staging area, until the output can be sized.

A legacy checkpoint is read once, before the output exists: its article rows
(in the output dtype) are appended to one scratch file, its articles (encoded
as the output takes them) to another, and the writer copies them from there
in index order. The rows file starts where the output's rows will start, so
that, read in index order, it can become the output as it is (see
:meth:`Scratch.rows_in_place`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import pwrite_all
from ..merging.row_blocks import RowBlock


class ScratchFile:
    """An append-only file in the staging area, for bytes to be copied into the output later.

    The first ``start`` bytes are left as a hole, for what precedes the rows
    in an output file that this file may become.
    """

    def __init__(self, path: Path, start: int = 0):
        self.path = path
        # The mode of an output file (see files.PreallocatedFile): this one may become the output.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.size = start

    def append(self, data: Any) -> int:
        """Write ``data`` (a contiguous buffer) after everything before it; the offset it starts at."""
        offset = self.size
        pwrite_all(self.fd, data, offset)
        self.size += memoryview(data).nbytes
        return offset

    def remove(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class StagedCheckpoint:
    """Where one legacy checkpoint's bytes wait in the scratch files."""

    source: Path
    rows_offset: int  # its article rows, back to back from here ...
    rows: int  # ... this many ...
    rows_length: int  # ... in this many bytes
    articles_offset: int  # its articles as the output encodes them, from here ...
    articles_length: int  # ... for this many bytes


class Scratch:
    """The two scratch files: rows from ``rows_start``, and encoded articles."""

    def __init__(self, directory: Path, rows_start: int, encode_articles: Callable[[RowBlock], bytes]):
        self.rows_start = rows_start
        self.encode_articles = encode_articles
        self.rows = ScratchFile(directory / "embeddings.scratch", rows_start)
        try:
            self.articles = ScratchFile(directory / "articles.scratch")
        except BaseException:
            self.rows.remove()
            raise

    def position(self) -> tuple[int, int]:
        """Where the next rows and articles go: give it to :meth:`staged_since`."""
        return self.rows.size, self.articles.size

    def add_block(self, rows: np.ndarray, block: RowBlock) -> None:
        """Append the article ``rows`` of ``block`` (in the output dtype), and its articles."""
        self.rows.append(np.ascontiguousarray(rows))
        self.articles.append(self.encode_articles(block))

    def staged_since(self, position: tuple[int, int], rows: int, source: Path) -> StagedCheckpoint:
        """What was appended since :meth:`position` gave ``position``: the ``rows`` of ``source``."""
        rows_offset, articles_offset = position
        return StagedCheckpoint(
            source, rows_offset, rows, self.rows.size - rows_offset, articles_offset, self.articles.size - articles_offset
        )

    def rows_in_place(self, staged: Sequence[StagedCheckpoint], nbytes: int) -> Path | None:
        """The rows file, if ``staged`` (in index order) lay every one of the output's ``nbytes``
        of rows back to back from :attr:`rows_start`: the file then holds them at their place."""
        expected = self.rows_start
        for part in staged:
            if part.rows_offset != expected:
                return None
            expected += part.rows_length
        return self.rows.path if expected == self.rows_start + nbytes else None

    def remove(self) -> None:
        """Delete the scratch files: their bytes are in the output, or nowhere."""
        self.rows.remove()
        self.articles.remove()
