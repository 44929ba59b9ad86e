"""The bundle: ``embeddings.npy`` (preallocated, filled in place), the articles, ``manifest.json``.

The rows are hashed in file order as they are written, after the ``.npy``
header, for the manifest's ``embeddings_sha256``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from ..merging.digest import BackgroundDigest
from .articles import ArticleWorker, JsonlArticles, ParquetArticles
from .files import EmbeddingsRegion, PreallocatedFile
from .forms import (
    ARTICLES_JSONL,
    ARTICLES_PARQUET,
    EMBEDDINGS_FILE,
    LEGACY_KEYS,
    MANIFEST_FILE,
    ArticlesFormat,
)
from .scratch import Scratch
from .writer import OutputWriter


class BundleWriter(OutputWriter):
    """The bundle's files in the staging directory: preallocated ``embeddings.npy``, articles, manifest.

    Parquet articles are written by ``worker`` in row groups of ``group_rows``.
    """

    def __init__(
        self, directory: Path, shape: tuple[int, int], dtype: np.dtype, articles_format: ArticlesFormat,
        scratch: Scratch, worker: ArticleWorker | None = None, group_rows: int = 0,
    ):
        dtype = np.dtype(dtype)
        self.directory = directory
        self.scratch = scratch
        header = io.BytesIO()
        npy_format.write_array_header_1_0(
            header, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        # If the disk is full already, the digest's thread and the file go with the error.
        with ExitStack() as undo:
            self._digest = undo.enter_context(BackgroundDigest())
            self._digest.update(header.getvalue())
            self._file = PreallocatedFile(directory / EMBEDDINGS_FILE, len(header.getvalue()) + shape[0] * shape[1] * dtype.itemsize)
            undo.callback(self._file.close)
            self._file.write_at(header.getvalue(), 0)
            self.embeddings = EmbeddingsRegion(self._file, len(header.getvalue()), shape, dtype, self._digest)
            self.articles_file = ARTICLES_PARQUET if articles_format == "parquet" else ARTICLES_JSONL
            self.articles: JsonlArticles | ParquetArticles = (
                ParquetArticles(directory / self.articles_file, worker, group_rows)
                if articles_format == "parquet"
                else JsonlArticles(directory / self.articles_file)
            )
            undo.pop_all()

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Write ``manifest.json`` (every legacy key but the first two) and close."""
        self.embeddings.check_complete()
        self.articles.finish()
        self._file.close()
        manifest = {**{key: metadata[key] for key in LEGACY_KEYS[2:]}, "embeddings_sha256": self._digest.hexdigest()}
        manifest.update(embeddings_file=EMBEDDINGS_FILE, articles_file=self.articles_file)
        (self.directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    def close(self) -> None:
        self._digest.close()
        self.articles.close()
        self._file.close()
