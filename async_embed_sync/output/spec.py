"""The output spec: what the merge writes, decided once (path, form, articles format, dtype, rows per shard).

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
    ARTICLES_FORMATS,
    DEFAULT_ARTICLES_FORMAT,
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    ArticlesFormat,
)
from .legacy_pickle import ROWS_OFFSET, LegacyPickleWriter, PickledArticles, is_merged_result
from .metadata_shards import DEFAULT_GROUP_ROWS
from .scratch import Scratch, StagedCheckpoint
from .shards import MAX_SHARDS, ShardPlan, default_shard_rows
from .writer import OutputWriter

OUTPUT_DTYPES = ("float32", "float16")


def _replaceable_pickle(path: Path) -> bool:
    """A file at a pickle output's path is replaced only if it is a merged result (a symlink never is:
    the merge would replace the link, not what it points to)."""
    if path.is_symlink() or not path.is_file():
        return False
    return is_merged_result(path)

Form = Literal["pickle", "bundle"]


@dataclass(frozen=True)
class OutputSpec:
    """One merged result: ``path``, its ``form``, its articles' format (None for a pickle), its ``dtype``.

    Build it with :meth:`decide`, which refuses what cannot be written.
    ``shard_rows``: a bundle's rows per shard (None: about 1 GiB of vectors,
    :func:`~.shards.default_shard_rows`). ``parquet_group_rows``: articles
    per parquet row group, at most.
    """

    path: Path
    form: Form
    articles_format: ArticlesFormat | None
    dtype: np.dtype
    shard_rows: int | None = None
    parquet_group_rows: int = DEFAULT_GROUP_ROWS

    @classmethod
    def decide(
        cls, path: str | Path, dtype: str = "float32", articles_format: ArticlesFormat | None = None,
        *, shard_rows: int | None = None, parquet_group_rows: int = DEFAULT_GROUP_ROWS,
    ) -> OutputSpec:
        """The spec of the output at ``path``: a ``.pkl`` or ``.pickle`` (any case) is the legacy pickle,
        anything else a bundle directory of shards of ``shard_rows`` rows, whose articles are
        ``articles_format`` (None: the default, :data:`~.forms.DEFAULT_ARTICLES_FORMAT`).

        Refuses, before any work, a dtype not in :data:`OUTPUT_DTYPES`, an articles format or
        a shard size there is not, and a path the merge could not or must not replace.
        """
        if dtype not in OUTPUT_DTYPES:
            raise MergeValidationError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}.")
        if articles_format is not None and articles_format not in ARTICLES_FORMATS:
            raise MergeValidationError(
                f"articles format {articles_format!r} is not one of {', '.join(ARTICLES_FORMATS)}.")
        if shard_rows is not None and (isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1):
            raise MergeValidationError(f"rows per shard must be a whole number of at least 1, not {shard_rows!r}.")
        path = Path(path)
        form: Form = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "bundle"
        if form == "pickle":
            articles_format = None  # a pickle's articles are in the pickle
        elif articles_format is None:
            articles_format = DEFAULT_ARTICLES_FORMAT
        spec = cls(path, form, articles_format, np.dtype(dtype), shard_rows, parquet_group_rows)
        spec.check_path()
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
                if (output.exists() or output.is_symlink()) and not _replaceable_pickle(output):
                    raise OutputError(
                        str(output),
                        "exists and is not a merged result (a pickle of the result's dict, as this tool "
                        "or the legacy script writes it, starting with 'embeddings' then 'articles'); "
                        "refusing to replace it. Delete it first, or choose another --output.")
            elif output.exists() or output.is_symlink():
                if not output.is_dir():
                    raise OutputError(str(output), "exists and is not a directory; refusing to replace it.")
                if any(output.iterdir()) and not (output / MANIFEST_FILE).is_file():
                    raise OutputError(str(output), "is a directory that is not a merged bundle; refusing to replace it.")

    @property
    def uses_article_worker(self) -> bool:
        """A bundle's articles are parsed, and written into its metadata shards, in the worker process."""
        return not self.is_pickle

    @property
    def surveys_article_keys(self) -> bool:
        """Parquet metadata has one set of columns for every shard: the worker learns them from every
        article before the first row is written (``output/metadata_shards.py``)."""
        return self.articles_format in ("parquet", "parquet-embeddings")

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
        if worker is None:
            raise ValueError("a bundle's articles are written by an article worker")
        plan = self.shard_plan(rows, dim)
        return BundleWriter(directory, plan, dim, self.dtype, self.articles_format or DEFAULT_ARTICLES_FORMAT,
                            scratch, worker, self.parquet_group_rows)

    def shard_plan(self, rows: int, dim: int) -> ShardPlan:
        """How a bundle of ``rows`` rows of ``dim`` values is cut; refuses more shards than names in order."""
        shard_rows = self.shard_rows or default_shard_rows(dim * self.dtype.itemsize)
        plan = ShardPlan(rows, shard_rows)
        if plan.count > MAX_SHARDS:
            raise MergeValidationError(
                f"{rows:,} rows in shards of {shard_rows:,} make {plan.count:,} shards; at most "
                f"{MAX_SHARDS:,} keep their names in row order. Give a larger --shard-rows.")
        return plan
