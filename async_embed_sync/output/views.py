"""Read-only views over a bundle's shards: the vectors as one array-like, the articles as one sequence.

Nothing is read until it is asked for: a view holds the shards' paths and
row counts (from the manifest), a vector shard's memory map, and the last
parquet row group or jsonl line index it read.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np
import orjson

from ..errors import OutputError


def _first_rows(counts: Sequence[int]) -> list[int]:
    firsts, total = [], 0
    for count in counts:
        firsts.append(total)
        total += count
    return firsts


class ShardedArray:
    """The rows of several ``.npy`` memory maps as one read-only 2-D array, indexed without reading the rest.

    ``x[i]``, ``x[i:j]``, ``x[i, k]``, ``x[:, k]``, ``x[indices]`` and
    ``x[mask]`` read only the rows they name (a slice within one shard is
    a view of its map, anything else a copy); ``np.asarray(x)`` reads
    everything. For whole-array work, go shard by shard: :attr:`shards`
    are the maps, in row order.
    """

    ndim = 2

    def __init__(self, shards: Sequence[np.memmap]):
        self.shards = tuple(shards)
        self.dtype = self.shards[0].dtype
        self.shape = (sum(len(shard) for shard in self.shards), self.shards[0].shape[1])
        self._firsts = _first_rows([len(shard) for shard in self.shards])

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedArray(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def _shard_of(self, row: int) -> int:
        return bisect.bisect_right(self._firsts, row) - 1

    def _row(self, row: int) -> np.ndarray:
        if not -self.shape[0] <= row < self.shape[0]:
            raise IndexError(f"row {row} is out of bounds for {self.shape[0]} rows")
        row %= self.shape[0]
        shard = self._shard_of(row)
        return self.shards[shard][row - self._firsts[shard]]

    def _rows(self, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step == 1:
                first, last = self._shard_of(start), self._shard_of(max(start, stop - 1))
                if first == last and stop > start:
                    offset = self._firsts[first]
                    return self.shards[first][start - offset : stop - offset]
            rows = np.arange(start, stop, step)
        indices = np.asarray(rows)
        if indices.dtype == bool:
            if indices.shape != (self.shape[0],):
                raise IndexError(f"a boolean index of shape {indices.shape} for {self.shape[0]} rows")
            indices = np.flatnonzero(indices)
        elif not np.issubdtype(indices.dtype, np.integer) and indices.size:
            raise IndexError("rows are indexed by integers, slices or a boolean mask")
        indices = indices.astype(np.int64).reshape(-1)
        if indices.size and (indices.min() < -self.shape[0] or indices.max() >= self.shape[0]):
            raise IndexError(f"a row index is out of bounds for {self.shape[0]} rows")
        indices = indices % max(1, self.shape[0])
        out = np.empty((len(indices), self.shape[1]), self.dtype)
        shard_of = np.searchsorted(self._firsts, indices, side="right") - 1
        for shard in np.unique(shard_of).tolist():
            where = shard_of == shard
            out[where] = self.shards[shard][indices[where] - self._firsts[shard]]
        return out

    def __getitem__(self, key: Any) -> Any:
        rest: tuple[Any, ...] = ()
        if isinstance(key, tuple):
            if key and key[0] is Ellipsis and len(key) == 2:
                key = (slice(None), key[1])
            key, rest = (key[0], key[1:]) if key else (slice(None), ())
        if key is Ellipsis:
            key = slice(None)
        if isinstance(key, (int, np.integer)):
            return self._row(int(key))[rest] if rest else self._row(int(key))
        picked = self._rows(key)
        return picked[(slice(None), *rest)] if rest else picked

    def __iter__(self) -> Iterator[np.ndarray]:
        for shard in self.shards:
            yield from shard

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.shards) if len(self.shards) > 1 else np.array(self.shards[0])
        return out if dtype is None else out.astype(dtype, copy=False)


class _ParquetShard:
    """One parquet file's rows, a row group at a time (the last one read is kept, as Arrow data)."""

    def __init__(self, path: Path, rows: int, columns: Sequence[str] | None, hidden: Collection[str]):
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(path)
        except OSError as exc:
            raise OutputError(str(path), f"cannot be read as parquet ({exc}).") from exc
        if self._file.metadata.num_rows != rows:
            raise OutputError(str(path), f"holds {self._file.metadata.num_rows} rows; the manifest says {rows}.")
        names = self._file.schema_arrow.names
        if columns is None:
            columns = [name for name in names if name not in hidden]
        missing = [name for name in columns if name not in names]
        if missing:
            raise OutputError(str(path), f"has no column {', '.join(map(repr, missing))}; it has {', '.join(names)}.")
        self._columns = list(columns)
        self._firsts = _first_rows([self._file.metadata.row_group(i).num_rows for i in range(self._file.num_row_groups)])
        self._group = -1
        self._table: Any = None

    def _group_table(self, group: int) -> Any:
        if group != self._group:
            self._table = self._file.read_row_group(group, columns=self._columns, use_threads=False)
            self._group = group
        return self._table

    def rows(self, start: int, stop: int) -> list[dict]:
        out: list[dict] = []
        group = bisect.bisect_right(self._firsts, start) - 1
        while start < stop:
            table = self._group_table(group)
            first = self._firsts[group]
            end = min(stop, first + table.num_rows)
            out.extend(table.slice(start - first, end - start).to_pylist())
            start, group = end, group + 1
        return out

    def __iter__(self) -> Iterator[dict]:
        for group in range(self._file.num_row_groups):
            for batch in self._group_table(group).to_batches(max_chunksize=4_096):
                yield from batch.to_pylist()


class _JsonlShard:
    """One JSON lines file's rows, by a line index made on first use (8 bytes a row)."""

    def __init__(self, path: Path, rows: int, columns: Sequence[str] | None, hidden: Collection[str]):
        self.path = path
        self._rows = rows
        self._columns = columns
        self._hidden = frozenset(hidden)
        self._starts: np.ndarray | None = None

    def _select(self, line: bytes) -> dict:
        row = orjson.loads(line)
        if self._columns is not None:
            return {name: row.get(name) for name in self._columns}
        for name in self._hidden.intersection(row):
            del row[name]
        return row

    def _line_starts(self) -> np.ndarray:
        if self._starts is None:
            ends = []
            offset = 0
            with self._open() as stream:
                while chunk := stream.read(16 << 20):
                    ends.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset + 1)
                    offset += len(chunk)
            starts = np.concatenate([[0], *ends]).astype(np.int64)
            self._check_lines(len(starts) - 1)
            self._starts = starts
        return self._starts

    def _open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except OSError as exc:
            raise OutputError(str(self.path), f"cannot be read ({exc.strerror or exc}).") from exc

    def _check_lines(self, lines: int) -> None:
        if lines != self._rows:
            raise OutputError(str(self.path), f"holds {lines} lines; the manifest says {self._rows}.")

    def rows(self, start: int, stop: int) -> list[dict]:
        starts = self._line_starts()
        with self._open() as stream:
            stream.seek(int(starts[start]))
            text = stream.read(int(starts[stop] - starts[start]))
        return [self._select(line) for line in text.splitlines()]

    def __iter__(self) -> Iterator[dict]:
        lines = 0
        with self._open() as stream:
            for line in stream:
                if lines == self._rows:
                    break
                lines += 1
                yield self._select(line)
            lines += sum(1 for _ in stream)
        self._check_lines(lines)


class ArticleRows(Sequence[dict]):
    """The articles of a bundle's metadata shards, in row order, as dicts made when asked for.

    ``articles[i]`` reads one row (the row group or line that holds it),
    iteration streams the shards in order, a slice is a list. ``columns``
    limits the fields read; without it each dict has every field but the
    ``hidden`` ones (the shards' ``row``: it is the position; their vectors).
    """

    def __init__(self, shards: Sequence[tuple[Path, int]], columns: Sequence[str] | None = None,
                 hidden: Collection[str] = ()):
        self._shards = list(shards)
        self._columns = None if columns is None else list(columns)
        self._hidden = frozenset(hidden)
        self._firsts = _first_rows([rows for _, rows in self._shards])
        self._length = sum(rows for _, rows in self._shards)
        self._open: dict[int, _ParquetShard | _JsonlShard] = {}

    def _shard(self, index: int) -> _ParquetShard | _JsonlShard:
        if index not in self._open:
            path, rows = self._shards[index]
            self._open.clear()  # one shard's index or row group at a time
            kind = _JsonlShard if path.suffix == ".jsonl" else _ParquetShard
            self._open[index] = kind(path, rows, self._columns, self._hidden)
        return self._open[index]

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> dict: ...
    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._length)
            return self._range(start, stop) if step == 1 else [self[i] for i in range(start, stop, step)]
        if not -self._length <= index < self._length:
            raise IndexError(f"article {index} is out of range for {self._length} articles")
        index %= self._length
        return self._range(index, index + 1)[0]

    def _range(self, start: int, stop: int) -> list[dict]:
        out: list[dict] = []
        while start < stop:
            shard = bisect.bisect_right(self._firsts, start) - 1
            first = self._firsts[shard]
            end = min(stop, first + self._shards[shard][1])
            out.extend(self._shard(shard).rows(start - first, end - first))
            start = end
        return out

    def __iter__(self) -> Iterator[dict]:
        for index in range(len(self._shards)):
            yield from self._shard(index)

    def __eq__(self, other: object) -> bool:
        # As a list compares: legacy code compares the articles to a list.
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return NotImplemented if not isinstance(other, Sequence) else False
        return all(mine == theirs for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ArticleRows({self._length} articles in {len(self._shards)} shards)"
