"""A bundle's article writers: ``articles.jsonl`` in the merge process, ``articles.parquet`` through the worker.

Both take a ``.npy`` checkpoint's article lines whole, after its rows
(:meth:`add_lines`), and a legacy checkpoint's articles as JSON lines
staged in a scratch file (:meth:`add_encoded`); neither takes anything
from a row block (:meth:`add_block`): that is the legacy pickle's way
(``output/legacy_pickle.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..merging.checkpoints import NpyCheckpoint
from ..merging.row_blocks import RowBlock
from .files import append_copied
from .scratch import ScratchFile


def json_lines(block: RowBlock) -> bytes:
    """The article rows of ``block`` as JSON lines, as a bundle's articles take them."""
    return b"".join(block.article_lines())


class _ArticlesFromLines:
    """Articles that come as whole checkpoints' lines, not from row blocks."""

    def add_block(self, block: RowBlock) -> None:
        pass  # its lines come with add_lines, after the checkpoint's rows


class JsonlArticles(_ArticlesFromLines):
    """``articles.jsonl``: one article per line, lines of ``.jsonl`` checkpoints copied verbatim.

    Nothing here parses them: the merge has every checkpoint line checked
    by the article worker (``merging/article_worker.py``) before it publishes.
    """

    def __init__(self, path: Path):
        self.path = path
        self._stream = open(path, "wb")

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        """Copy the article lines of ``checkpoint`` as they are, in the kernel."""
        with open(checkpoint.articles_path, "rb") as source:
            append_copied(self._stream, source.fileno(), [span[:2] for span in checkpoint.article_spans()])
        if not checkpoint.lines.ends_with_newline and checkpoint.lines.rows - 1 not in checkpoint.lines.dropped:
            self._stream.write(b"\n")

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        """Append ``length`` bytes of JSON lines made from the rows of ``source``, at ``offset`` of ``scratch``."""
        append_copied(self._stream, scratch.fd, [(offset, length)])

    def close(self) -> None:
        self._stream.close()

    finish = close


class ArticleWorker(Protocol):
    # merging/article_worker.ArticleWorker, which imports this package.
    def write_parquet(self, path: Path, group_rows: int) -> None: ...
    def submit(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None: ...
    def finish(self) -> None: ...


class ParquetArticles(_ArticlesFromLines):
    """``articles.parquet``, parsed and written by the article worker process from the lines it is sent.

    The merge process hands over byte spans of JSON lines (the article
    lines of ``.jsonl`` checkpoints, and legacy checkpoints' rows, which wait
    in the staging area as JSON lines); it never imports pyarrow. Row groups
    hold ``group_rows`` articles (see ``output/parquet_rows.py``).
    """

    def __init__(self, path: Path, worker: ArticleWorker, group_rows: int):
        self.path = path
        self._worker = worker
        worker.write_parquet(path, group_rows)

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        self._worker.submit(checkpoint.articles_path, checkpoint.article_spans())

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        self._worker.submit(scratch.path, [(offset, length, 1)], source)

    def finish(self) -> None:
        """Wait until the worker has written and closed the file; raise what went wrong there."""
        self._worker.finish()

    def close(self) -> None:
        pass  # after a failure, the merge stops the worker: nothing to wait for
