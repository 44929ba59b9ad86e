"""A bundle's articles: sent to the article worker, which writes them into the metadata shards.

The merge process hands over byte spans of JSON lines: the article lines of
``.jsonl`` checkpoints (:meth:`WorkerArticles.add_lines`, after the
checkpoint's rows), and legacy checkpoints' rows, which wait in the staging
area as JSON lines (:meth:`WorkerArticles.add_encoded`). It never parses
them nor imports pyarrow: the worker does (``merging/article_worker.py``,
``output/metadata_shards.py``). Nothing is taken from a row block
(:meth:`add_block`): that is the legacy pickle's way (``output/legacy_pickle.py``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from ..merging.checkpoints import NpyCheckpoint
from ..merging.row_blocks import RowBlock
from .forms import ArticlesFormat
from .scratch import ScratchFile
from .shards import ShardPlan


def json_lines(block: RowBlock) -> bytes:
    """The article rows of ``block`` as JSON lines, as a bundle's articles take them."""
    return b"".join(block.article_lines())


class ArticleWorker(Protocol):
    # merging/article_worker.ArticleWorker, which imports this package.
    def write_metadata(self, directory: Path, plan: ShardPlan, articles_format: ArticlesFormat,
                       group_rows: int) -> None: ...
    def submit(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None: ...
    def finish(self) -> list[tuple[int, str]]: ...


class WorkerArticles:
    """The metadata shards of ``plan`` in ``directory``, written by ``worker`` from the lines it is sent."""

    def __init__(self, directory: Path, plan: ShardPlan, articles_format: ArticlesFormat, worker: ArticleWorker,
                 group_rows: int):
        self._worker = worker
        worker.write_metadata(directory, plan, articles_format, group_rows)

    def add_block(self, block: RowBlock) -> None:
        pass  # its lines come with add_lines, after the checkpoint's rows

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        self._worker.submit(checkpoint.articles_path, checkpoint.article_spans())

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        self._worker.submit(scratch.path, [(offset, length, 1)], source)

    def finish(self) -> list[tuple[int, str]]:
        """Wait until the worker has written and closed every shard; each one's (rows, sha256).

        Raises what went wrong there.
        """
        return self._worker.finish()

    def close(self) -> None:
        pass  # after a failure, the merge stops the worker: nothing to wait for
