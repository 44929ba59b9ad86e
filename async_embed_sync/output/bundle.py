"""The bundle: the vectors into ``embeddings/`` shards (preallocated, filled in place), the articles
into ``metadata/`` shards through the article worker, then ``manifest.json`` and ``SHA256SUMS``.

Each shard's rows are hashed in file order as they are written, header
first, so that the manifest's sha256 is the file's; the article worker
hashes the metadata shards it writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ..merging.digest import BackgroundDigest
from .articles import ArticleWorker, WorkerArticles
from .files import EmbeddingsRegion, PreallocatedFile, copy_rows_hashed, npy_header
from .forms import (
    CHECKSUMS_FILE,
    EMBEDDINGS_DIR,
    LAYOUT_VERSION,
    LEGACY_KEYS,
    MANIFEST_FILE,
    METADATA_DIR,
    ArticlesFormat,
    metadata_suffix,
)
from .scratch import Scratch
from .shards import ShardPlan
from .writer import OutputWriter


class ShardedEmbeddings:
    """The merged rows, in order, across the ``.npy`` shards of ``plan``: one open at a time.

    A shard is made (preallocated, its header written) when its first row
    comes, and hashed and closed when its last one has.
    """

    def __init__(self, directory: Path, plan: ShardPlan, dim: int, dtype: np.dtype):
        self.directory = directory
        self.plan = plan
        self.shape = (plan.rows, dim)
        self.dtype = np.dtype(dtype)
        self.sha256: list[str] = []  # of the shards done, in order
        self._region: EmbeddingsRegion | None = None
        self._undo = ExitStack()
        self._open(0)

    def _open(self, index: int) -> None:
        shape = (self.plan.rows_of(index), self.shape[1])
        header = npy_header(shape, self.dtype)
        with ExitStack() as undo:
            digest = undo.enter_context(BackgroundDigest())
            digest.update(header)
            file = PreallocatedFile(self.directory / self.plan.embeddings_name(index), len(header) + shape[0] * self.shape[1] * self.dtype.itemsize)
            undo.callback(file.close)
            file.write_at(header, 0)
            self._region = EmbeddingsRegion(file, len(header), shape, self.dtype, digest)
            self._undo = undo.pop_all()

    def _close_full_shard(self) -> None:
        region = self._region
        assert region is not None and region.digest is not None
        self.sha256.append(region.digest.hexdigest())
        self._undo.close()
        self._region = None
        if len(self.sha256) < self.plan.count:
            self._open(len(self.sha256))

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` after the previous ones; they must stay unchanged until :meth:`wait`."""
        while len(rows):
            region = self._region
            if region is None:
                raise OutputError(str(self.directory / EMBEDDINGS_DIR), "more rows than were planned.")
            take = min(len(rows), region.shape[0] - region.rows_written)
            region.append(rows[:take])
            rows = rows[take:]
            if region.rows_written == region.shape[0]:
                self._close_full_shard()

    def wait(self) -> None:
        """Block until the rows given so far are hashed: their buffer may then be reused."""
        if self._region is not None:
            self._region.wait()

    def copy_from(self, source_fd: int, offset: int, rows: int) -> None:
        copy_rows_hashed(self, source_fd, offset, rows)

    def check_complete(self) -> None:
        if self._region is not None and self._region.shape[0] == 0:
            self._close_full_shard()  # the one shard of a result without rows
        if len(self.sha256) != self.plan.count:
            written = sum(self.plan.rows_of(index) for index in range(len(self.sha256)))
            if self._region is not None:
                written += self._region.rows_written
            raise OutputError(str(self.directory / EMBEDDINGS_DIR), f"{written} rows written, {self.plan.rows} planned.")

    def close(self) -> None:
        self._undo.close()


class BundleWriter(OutputWriter):
    """The bundle's shards in the staging ``directory``, cut as ``plan`` says; articles in ``articles_format``.

    The article worker writes the metadata shards, in row groups of
    ``group_rows`` articles (fewer where they would exceed its byte bound).
    """

    def __init__(
        self, directory: Path, plan: ShardPlan, dim: int, dtype: np.dtype, articles_format: ArticlesFormat,
        scratch: Scratch, worker: ArticleWorker, group_rows: int,
    ):
        self.directory = directory
        self.plan = plan
        self.articles_format = articles_format
        self.scratch = scratch
        (directory / EMBEDDINGS_DIR).mkdir()
        (directory / METADATA_DIR).mkdir()
        self.embeddings = ShardedEmbeddings(directory, plan, dim, dtype)
        self.articles = WorkerArticles(directory, plan, articles_format, worker, group_rows)

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Write ``manifest.json`` (every legacy key but the first two, and the shards) and ``SHA256SUMS``."""
        self.embeddings.check_complete()
        metadata_shards = self.articles.finish()
        suffix = metadata_suffix(self.articles_format)
        plan = self.plan
        shards = []
        for index, (embeddings_sha256, (metadata_rows, metadata_sha256)) in enumerate(
            zip(self.embeddings.sha256, metadata_shards, strict=True)
        ):
            if metadata_rows != plan.rows_of(index):
                raise OutputError(str(self.directory / plan.metadata_name(index, suffix)),
                                  f"holds {metadata_rows} articles for {plan.rows_of(index)} embedding rows.")
            shards.append({
                "embeddings": plan.embeddings_name(index),
                "metadata": plan.metadata_name(index, suffix),
                "first_row": plan.first_row(index),
                "rows": plan.rows_of(index),
                "embeddings_sha256": embeddings_sha256,
                "metadata_sha256": metadata_sha256,
            })
        manifest = {
            "layout_version": LAYOUT_VERSION,
            **{key: metadata[key] for key in LEGACY_KEYS[2:]},
            "dtype": self.embeddings.dtype.name,
            "articles_format": self.articles_format,
            "shard_rows": plan.shard_rows,
            "shards": shards,
        }
        (self.directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        (self.directory / CHECKSUMS_FILE).write_text(
            "".join(f"{shard[kind + '_sha256']}  {shard[kind]}\n" for shard in shards for kind in ("embeddings", "metadata")),
            encoding="utf-8",
        )

    def close(self) -> None:
        self.embeddings.close()
        self.articles.close()
