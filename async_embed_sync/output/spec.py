"""The output spec: what the merge writes, decided once (path, form, articles format, dtype, shards).

Everything that depends on the form asks the spec: the checks of the path,
whether the article worker runs and checks checkpoint lines, how legacy
checkpoints are staged, and which writer fills the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import (
    AFTER_MERGE,
    MergeValidationError,
    OutputError,
    translating_local_errors,
)
from .articles import ArticleWorker, json_lines
from .bundle import BundleWriter
from .forms import (
    DEFAULT_ARTICLES_FORMAT,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    ArticlesFormat,
    parquet_available,
)
from .legacy_pickle import ROWS_OFFSET, LegacyPickleWriter, PickledArticles
from .parquet_rows import DEFAULT_GROUP_ROWS
from .scratch import Scratch, StagedCheckpoint
from .writer import OutputWriter

OUTPUT_DTYPES = ("float32", "float16")

Form = Literal["pickle", "bundle"]


@dataclass(frozen=True)
class OutputSpec:
    """One merged result: ``path``, its ``form``, its articles' format (None for a pickle), its ``dtype``.

    Build it with :meth:`decide`, which refuses what cannot be written.
    ``parquet_group_rows``: articles per parquet row group (the worker's
    memory bound). ``shards``: one file of rows; the only count there is yet.
    """

    path: Path
    form: Form
    articles_format: ArticlesFormat | None
    dtype: np.dtype
    shards: int = 1
    parquet_group_rows: int = DEFAULT_GROUP_ROWS

    @classmethod
    def decide(
        cls, path: str | Path, dtype: str = "float32", articles_format: ArticlesFormat | None = None,
        *, parquet_group_rows: int = DEFAULT_GROUP_ROWS,
    ) -> OutputSpec:
        """The spec of the output at ``path``: a ``.pkl`` or ``.pickle`` (any case) is the legacy pickle,
        anything else a bundle directory, whose articles are ``articles_format`` (None: the
        default, :data:`~.forms.DEFAULT_ARTICLES_FORMAT`).

        Refuses, before any work, a dtype not in :data:`OUTPUT_DTYPES`, a path the merge
        could not or must not replace, and parquet without pyarrow.
        """
        if dtype not in OUTPUT_DTYPES:
            raise MergeValidationError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}.")
        path = Path(path)
        form: Form = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "bundle"
        if form == "pickle":
            articles_format = None  # a pickle's articles are in the pickle
        elif articles_format is None:
            articles_format = DEFAULT_ARTICLES_FORMAT
        spec = cls(path, form, articles_format, np.dtype(dtype), parquet_group_rows=parquet_group_rows)
        spec.check_path()
        if articles_format == "parquet" and not parquet_available():
            raise OutputError(str(path), "articles.parquet needs pyarrow, which is not installed: "
                                         "pip install 'async_embed_sync[parquet]', or leave out "
                                         "--articles-format for articles.jsonl.")
        return spec

    @property
    def is_pickle(self) -> bool:
        return self.form == "pickle"

    def check_path(self) -> None:
        """Refuse an output path that the merge could not or must not replace."""
        output = self.path
        with translating_local_errors(output, "write", AFTER_MERGE):
            if self.is_pickle:
                if output.is_dir():
                    raise OutputError(str(output), "is a directory; a .pkl or .pickle output must be a file.")
            elif output.exists() or output.is_symlink():
                if not output.is_dir():
                    raise OutputError(str(output), "exists and is not a directory; refusing to replace it.")
                if any(output.iterdir()) and not (output / MANIFEST_FILE).is_file():
                    raise OutputError(str(output), "is a directory that is not a merged bundle; refusing to replace it.")

    @property
    def uses_article_worker(self) -> bool:
        """A bundle's articles are parsed in the worker process (and written there if they are parquet)."""
        return not self.is_pickle

    @property
    def copies_checkpoint_lines(self) -> bool:
        """True when the output takes the lines of ``.jsonl`` checkpoints verbatim, unparsed.

        Only a bundle's ``articles.jsonl`` does: a ``.pkl`` output reads each
        article row as a dict, and the article worker parses every row that
        goes into ``articles.parquet``. Those lines are parsed by no one else:
        the worker checks every line of every checkpoint.
        """
        return self.articles_format == "jsonl"

    def open_scratch(self, directory: Path) -> Scratch:
        """The scratch files of legacy checkpoints, in ``directory``: their rows start where the
        legacy pickle's do, their articles are encoded as this output takes them."""
        if self.is_pickle:
            return Scratch(directory, ROWS_OFFSET, PickledArticles.encode)
        return Scratch(directory, 0, json_lines)

    def open_writer(
        self, directory: Path, rows: int, dim: int, scratch: Scratch, staged: Sequence[StagedCheckpoint],
        worker: ArticleWorker | None = None,
    ) -> OutputWriter:
        """The writer of ``rows`` rows of ``dim`` values, into the staging ``directory``.

        ``scratch`` holds the legacy checkpoints ``staged`` (in index order);
        ``worker``, the article worker, writes parquet articles.
        """
        if self.is_pickle:
            return LegacyPickleWriter(directory / self.path.name, (rows, dim), self.dtype, scratch, staged)
        if self.articles_format == "parquet" and worker is None:
            raise ValueError("parquet articles are written by an article worker")
        return BundleWriter(directory, (rows, dim), self.dtype, self.articles_format or DEFAULT_ARTICLES_FORMAT,
                            scratch, worker, self.parquet_group_rows)
