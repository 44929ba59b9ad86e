"""A bundle's articles into its metadata shards, each row with its global ``row`` first: runs in the article worker.

The only module of the package that imports pyarrow, and only there: the
merge process hands the rows over as JSON lines (``output/articles.py``).
Shards are cut where the embeddings' are (``output/shards.py``), and each
is hashed once it is closed, for the manifest.

Memory: parsed rows are turned into Arrow batches :data:`BATCH_ROWS` at a
time; a row group is written at ``group_rows`` rows or
:data:`GROUP_BYTES` of Arrow data, whichever comes first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ..errors import (
    AFTER_MERGE,
    CheckpointError,
    local_file_error,
    translating_local_errors,
)
from ..fileio import file_sha256
from .forms import ROW_COLUMN, VECTOR_COLUMN, ArticlesFormat, metadata_suffix
from .shards import ShardPlan

# About 100k rows a group (DuckDB writes 122,880, pyarrow up to 1Mi): readers
# skip by group, and the row statistics let them filter on ``row``.
DEFAULT_GROUP_ROWS = 100_000
BATCH_ROWS = 4_096  # parsed dicts held at once
GROUP_BYTES = 128 << 20  # long texts, or the vectors of parquet-embeddings, make groups shorter


def _refuse_reserved_key(name: str, source: Path | None) -> CheckpointError:
    use = "the global row number" if name == ROW_COLUMN else "the vectors"
    return CheckpointError(
        str(source), f"its article rows have a {name!r} key, which a bundle's metadata keeps for {use}; "
                     f"write a .pkl output, or rename the key where the rows are made.",
    )


def _low_retention_memory_pool(pa: Any) -> Any:
    # Arrow's default pool (mimalloc) keeps much of what a row group freed:
    # jemalloc, where the wheel has it, gives the worker a lower peak.
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return pa.default_memory_pool()


class ArticleKeys:
    """The top-level keys of every article, in the order first seen, and a few of each key's values.

    Learnt from every article before the first row is written (the worker's
    survey), so that the parquet columns hold every key, whichever rows
    have it. A key's values are kept while they bring a kind not seen yet,
    and containers (whose own keys may vary) up to :data:`SAMPLES` each.
    """

    SAMPLES = 64

    def __init__(self) -> None:
        self._samples: dict[str, list[Any]] = {}
        self._kinds: dict[str, dict[type, Path]] = {}  # each kind of a key's values: where it was first seen

    def add(self, rows: list[dict], source: Path) -> None:
        for row in rows:
            for key, value in row.items():
                samples = self._samples.get(key)
                if samples is None:
                    samples = self._samples[key] = []
                    self._kinds[key] = {type(None): source}
                if value is None or len(samples) >= self.SAMPLES:
                    continue
                kinds = self._kinds[key]
                if type(value) not in kinds or type(value) in (dict, list):
                    kinds.setdefault(type(value), source)
                    samples.append(value)

    def __contains__(self, key: str) -> bool:
        return key in self._samples

    def source(self, key: str) -> Path:
        """The first checkpoint whose articles have ``key``."""
        return self._kinds[key][type(None)]

    def struct_type(self, pa: Any) -> Any:
        """The Arrow struct of an article: a column for each key, of the type its values share."""
        fields = []
        for key, samples in self._samples.items():
            try:
                fields.append(pa.field(key, pa.array(samples).type))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                kinds = {kind: path for kind, path in self._kinds[key].items() if kind is not type(None)}
                where = "; ".join(f"{kind.__name__} first in {path}" for kind, path in kinds.items())
                raise CheckpointError(
                    str(list(kinds.values())[-1]),
                    f"the article key {key!r} holds values of kinds that no one parquet column holds "
                    f"({where}: {exc}); --articles-format jsonl keeps rows of any shape.",
                ) from exc
        return pa.struct(fields)


class _JsonlShard:
    def __init__(self, path: Path):
        self.path = path
        self._stream = open(path, "wb")

    def add(self, rows: list[dict], first_row: int, source: Path) -> None:
        lines = []
        for number, row in enumerate(rows, first_row):
            if ROW_COLUMN in row:
                raise _refuse_reserved_key(ROW_COLUMN, source)
            lines.append(orjson.dumps({ROW_COLUMN: number, **row}))
            lines.append(b"\n")
        self._stream.write(b"".join(lines))

    def close(self) -> None:
        self._stream.close()


class _ParquetColumns:
    """What every parquet shard holds: ``row``, a column for each article key (``keys``), the vectors."""

    def __init__(self, keys: ArticleKeys) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pa.set_memory_pool(_low_retention_memory_pool(pa))
        self.pa, self.pq = pa, pq
        self.keys = keys
        self.articles_type: Any = None

    def batch(self, rows: list[dict], first_row: int, source: Path, vectors: np.ndarray | None) -> Any:
        pa = self.pa
        if self.articles_type is None:
            for name in (ROW_COLUMN, VECTOR_COLUMN):
                if name in self.keys and (name == ROW_COLUMN or vectors is not None):
                    raise _refuse_reserved_key(name, self.keys.source(name))
            self.articles_type = self.keys.struct_type(pa)
        extra = set().union(*rows).difference(field.name for field in self.articles_type)
        if extra:  # the survey saw every row: only a file that changed since has others
            raise CheckpointError(str(source), f"its article rows have keys ({', '.join(sorted(extra))}) that "
                                               f"they had not when it was read; run the merge again.")
        try:
            articles = pa.array(rows, type=self.articles_type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise CheckpointError(
                str(source),
                f"its article rows do not fit the parquet columns that all the articles' values make "
                f"({exc}); --articles-format jsonl keeps rows of any shape.",
            ) from exc
        names = [ROW_COLUMN, *(field.name for field in self.articles_type)]
        arrays = [pa.array(np.arange(first_row, first_row + len(rows), dtype=np.int64)),
                  *(articles.field(index) for index in range(self.articles_type.num_fields))]
        if vectors is not None:
            names.append(VECTOR_COLUMN)
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))
        return pa.RecordBatch.from_arrays(arrays, names=names)


class _ParquetShard:
    def __init__(self, path: Path, columns: _ParquetColumns, group_rows: int, embeddings: Path | None):
        self.path = path
        self.columns = columns
        self.group_rows = group_rows
        self._vectors = np.load(embeddings, mmap_mode="r") if embeddings is not None else None
        self._batches: list[Any] = []
        self._rows = 0  # in self._batches
        self._bytes = 0
        self._written = 0
        self._writer: Any = None

    def add(self, rows: list[dict], first_row: int, source: Path) -> None:
        start = 0
        while start < len(rows):
            # A group holds group_rows rows exactly, but the last one.
            part = rows[start : start + min(BATCH_ROWS, self.group_rows - self._rows)]
            vectors = None
            if self._vectors is not None:
                local = self._written + self._rows
                # Written by the merge process before it sent these rows' lines.
                vectors = np.ascontiguousarray(self._vectors[local : local + len(part)])
            batch = self.columns.batch(part, first_row + start, source, vectors)
            self._batches.append(batch)
            self._rows += batch.num_rows
            self._bytes += batch.nbytes
            if self._rows >= self.group_rows or self._bytes >= GROUP_BYTES:
                self._write_group()
            start += len(part)

    def _write_group(self) -> None:
        pa = self.columns.pa
        table = pa.Table.from_batches(self._batches)
        if self._writer is None:
            # No dictionary encoding: article columns (ids, titles, texts)
            # rarely repeat a value, and the dictionaries cost memory.
            self._writer = self.columns.pq.ParquetWriter(self.path, table.schema, use_dictionary=False)
        self._writer.write_table(table, row_group_size=max(1, table.num_rows))
        self._written += table.num_rows
        self._batches, self._rows, self._bytes = [], 0, 0

    def close(self) -> None:
        if self._batches:
            self._write_group()
        if self._writer is None:
            # No article at all: still a readable file, with its row column.
            pa = self.columns.pa
            self.columns.pq.write_table(pa.table({ROW_COLUMN: pa.array([], pa.int64())}), self.path)
        else:
            self._writer.close()


class MetadataShards:
    """The metadata shards of ``plan`` in ``directory``, filled in row order by :meth:`add`.

    Parquet shards' columns are ``row`` then every key that ``keys`` saw
    in the articles; a key missing from a row is stored as null and reads
    back as ``None``. Values of a key must fit one column type (ints and
    floats do, as floats); others are refused, naming the checkpoint.
    """

    def __init__(self, directory: Path, plan: ShardPlan, articles_format: ArticlesFormat, group_rows: int,
                 keys: ArticleKeys | None = None):
        self.directory = directory
        self.plan = plan
        self.articles_format = articles_format
        self.group_rows = group_rows
        self._suffix = metadata_suffix(articles_format)
        self._columns = None if articles_format == "jsonl" else _ParquetColumns(keys or ArticleKeys())
        self._index = -1  # the shard open now
        self._shard: _JsonlShard | _ParquetShard | None = None
        self._next_row = 0
        self.done: list[tuple[int, str]] = []  # (rows, sha256) of each shard closed

    def _path(self, index: int) -> Path:
        return self.directory / self.plan.metadata_name(index, self._suffix)

    def _open_next(self) -> None:
        self._index += 1
        path = self._path(self._index)
        with translating_local_errors(path, "write", AFTER_MERGE):
            if self._columns is None:
                self._shard = _JsonlShard(path)
            else:
                embeddings = (self.directory / self.plan.embeddings_name(self._index)
                              if self.articles_format == "parquet-embeddings" else None)
                self._shard = _ParquetShard(path, self._columns, self.group_rows, embeddings)

    def _close_shard(self) -> None:
        assert self._shard is not None
        path = self._shard.path
        with translating_local_errors(path, "write", AFTER_MERGE):
            self._shard.close()
            self.done.append((self._next_row - self.plan.first_row(self._index), file_sha256(path)))
        self._shard = None

    def add(self, rows: list[dict], source: Path) -> None:
        """Add ``rows``, the next article rows in order, which come from the checkpoint ``source`` (named in errors)."""
        while rows:
            if self._shard is None:
                if self._index + 1 >= self.plan.count:
                    raise CheckpointError(str(source), "its articles are more than the merge planned for.")
                self._open_next()
            end = self.plan.first_row(self._index) + self.plan.rows_of(self._index)
            take = min(len(rows), end - self._next_row)
            try:
                self._shard.add(rows[:take], self._next_row, source)
            except OSError as exc:
                raise local_file_error(exc, self._shard.path, "write", AFTER_MERGE) from exc
            self._next_row += take
            rows = rows[take:]
            if self._next_row == end:
                self._close_shard()

    def close(self) -> list[tuple[int, str]]:
        """Close the last shard; each shard's (rows, sha256), in order."""
        if self._shard is None and self._index < 0:
            self._open_next()  # a result without rows still has its one shard
        if self._shard is not None:
            self._close_shard()
        return self.done
