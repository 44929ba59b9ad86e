"""Article rows into a parquet file, one row group at a time: runs in the article worker process.

The only module of the package that imports pyarrow, and only there: the
merge process hands the rows over as JSON lines (see ``output/articles.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import (
    AFTER_MERGE,
    CheckpointError,
    local_file_error,
    translating_local_errors,
)

# Parquet row groups hold this many articles unless told otherwise: the
# article worker's memory stays bounded by one group (see benchmarks/RESULTS-merge.md).
DEFAULT_GROUP_ROWS = 4_096


def _low_retention_memory_pool(pa: Any) -> Any:
    # Arrow's default pool (mimalloc) keeps much of what a row group freed:
    # jemalloc, where the wheel has it, gives the worker a lower peak.
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return pa.default_memory_pool()


class ParquetRowWriter:
    """Article rows into a parquet file, one row group of ``group_rows`` rows at a time.

    Runs in the article worker process. The columns are the keys of the
    first row group's rows; a key missing from a row is stored as null and
    reads back as ``None``. A parquet file has one set of columns: a later
    row with a key that the first group had not is refused, not dropped.
    """

    def __init__(self, path: Path, group_rows: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pa.set_memory_pool(_low_retention_memory_pool(pa))
        self._pa, self._pq = pa, pq
        self.path = path
        self.group_rows = group_rows
        self._pending: list[dict] = []
        self._source: Path | None = None
        self._type: Any = None
        self._writer: Any = None

    def add(self, rows: list[dict], source: Path) -> None:
        """Add ``rows``, which come from the checkpoint ``source`` (named in errors)."""
        self._source = source
        self._pending.extend(rows)
        while len(self._pending) >= self.group_rows:
            group, self._pending = self._pending[: self.group_rows], self._pending[self.group_rows :]
            self._write(group)

    def _write(self, group: list[dict]) -> None:
        pa = self._pa
        try:
            if self._type is None:
                rows = pa.array(group)
                self._type = rows.type
                # No dictionary encoding: article columns (ids, titles, texts)
                # rarely repeat a value, and the dictionaries cost memory.
                self._writer = self._pq.ParquetWriter(self.path, pa.schema(list(self._type)), use_dictionary=False)
            else:
                extra = set().union(*group).difference(field.name for field in self._type)
                if extra:
                    raise CheckpointError(
                        str(self._source),
                        f"article rows up to this checkpoint's have keys ({', '.join(sorted(extra))}) that the "
                        f"first {self.group_rows:,} rows (the parquet columns) did not have, and a parquet file "
                        f"has one set of columns; --articles-format jsonl keeps every key.",
                    )
                rows = pa.array(group, type=self._type)
            self._writer.write_batch(pa.RecordBatch.from_struct_array(rows))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise CheckpointError(
                str(self._source),
                f"article rows up to this checkpoint's do not fit the parquet columns of the rows before "
                f"them ({exc}); --articles-format jsonl keeps rows of any shape.",
            ) from exc
        except OSError as exc:
            raise local_file_error(exc, self.path, "write", AFTER_MERGE) from exc

    def close(self) -> None:
        if self._pending:
            self._write(self._pending)
            self._pending = []
        with translating_local_errors(self.path, "write", AFTER_MERGE):
            if self._writer is None:
                # No article at all: still a readable, empty file.
                self._pq.write_table(self._pa.table({}), self.path)
            else:
                self._writer.close()
