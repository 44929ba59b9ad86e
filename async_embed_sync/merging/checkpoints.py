"""Find and open checkpoints of both formats as uniform shards, each consistent in itself.

A checkpoint is untrusted input. A ``.pkl`` is read through the restricted
unpickler (``merging/safe_pickle.py``); a ``.npy`` is mapped with
``allow_pickle=False`` once its header matches the file size. An opened
checkpoint has a 2-D array with as many rows as its index range spans and
as its article list holds, or a :class:`CheckpointError` names the file.
Rules across checkpoints, and merge policy, are ``merging/merge.py``'s.
"""

from __future__ import annotations

import functools
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from ..errors import CheckpointError
from ..gone import articles_file_name
from ..layout import DownloadLayout
from .digest import as_bytes
from .jsonl_index import index_jsonl
from .row_blocks import DictRowBlock, JsonLineRowBlock, RowBlock
from .rows import article_mask
from .safe_pickle import MAPPED_PAYLOAD_BYTES, restricted_load_mapped

LEGACY_SUFFIX = ".pkl"
NPY_SUFFIX = ".npy"


def find_checkpoints(download_dir: Path) -> list[Path]:
    """The complete files ``layout.py`` lists (never a partial, nor the
    journal), of the two checkpoint suffixes, sorted by path."""
    return [path for path in DownloadLayout(download_dir).complete_files()
            if path.suffix in (LEGACY_SUFFIX, NPY_SUFFIX)]


@dataclass(frozen=True)
class CheckpointInfo:
    """What validation and ``chunk_info`` need to know about one checkpoint."""

    path: Path
    cluster: str
    start_index: int
    end_index: int
    rows: int
    dim: int
    dtype: np.dtype
    model: str
    gpu_id: int | None
    hostname: str | None
    size_bytes: int
    article_rows: int
    # N, the rows of the whole run, where the embedding job wrote it.
    total_rows: int | None = None


@dataclass(frozen=True)
class _Fields:
    start_index: int
    end_index: int
    model: str
    gpu_id: int | None
    hostname: str | None
    total_rows: int | None


def _read_fields(document: Mapping[str, Any], path: Path) -> _Fields:
    def integer(key: str) -> int | None:
        value = document.get(key)
        is_integer = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        return int(value) if is_integer else None

    def text(key: str) -> str | None:
        value = document.get(key)
        return value if isinstance(value, str) else None

    start_index, end_index, model = integer("start_index"), integer("end_index"), text("model")
    for key, value in (("start_index", start_index), ("end_index", end_index), ("model", model)):
        if value is None:
            raise CheckpointError(str(path), f"{key!r} is missing or of the wrong type.")
    return _Fields(
        start_index=start_index,
        end_index=end_index,
        model=model,
        gpu_id=integer("gpu_id"),
        hostname=text("hostname"),
        total_rows=integer("total_rows"),
    )


def _check_row_dicts(rows: list[Any], path: Path) -> None:
    if not all(isinstance(row, dict) for row in rows):
        raise CheckpointError(str(path), "the article list holds an entry that is not a dict.")


class Checkpoint(ABC):
    """One opened checkpoint: its info, its array and its rows block by block."""

    def __init__(self, path: Path, cluster: str | None):
        self.path = Path(path)
        self.cluster = cluster if cluster is not None else DownloadLayout.cluster_of(self.path)

    info: CheckpointInfo
    embeddings: np.ndarray

    @abstractmethod
    def blocks(self, max_rows: int) -> Iterator[RowBlock]:
        """The rows in order, at most ``max_rows`` at a time.

        A block may be a view of a buffer reused by the next block: use it
        before asking for the next one.
        """

    def _make_info(self, fields: _Fields, article_rows: int, row_count: int) -> CheckpointInfo:
        rows, dim = self.embeddings.shape
        path = str(self.path)
        if fields.end_index - fields.start_index != rows:
            raise CheckpointError(
                path,
                f"its index range [{fields.start_index}, {fields.end_index}) spans "
                f"{fields.end_index - fields.start_index} rows but the array has {rows}.",
            )
        if row_count != rows:
            raise CheckpointError(
                path, f"the array has {rows} rows but the article list has {row_count} entries."
            )
        return CheckpointInfo(
            path=self.path,
            cluster=self.cluster,
            start_index=fields.start_index,
            end_index=fields.end_index,
            rows=rows,
            dim=dim,
            dtype=self.embeddings.dtype,
            model=fields.model,
            gpu_id=fields.gpu_id,
            hostname=fields.hostname,
            size_bytes=self.path.stat().st_size,
            article_rows=article_rows,
            total_rows=fields.total_rows,
        )


def _require_matrix(array: Any, path: Path) -> np.ndarray:
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        raise CheckpointError(str(path), "'embeddings' is not a 2-D numpy array.")
    if array.dtype.hasobject:
        raise CheckpointError(str(path), "'embeddings' is an object array, which is refused.")
    return array


class LegacyCheckpoint(Checkpoint):
    """A legacy pickle, loaded whole (through the restricted unpickler), its array mapped read-only.

    An array payload of ``mapped_payload_bytes`` or more is mapped, a smaller one read.
    """

    def __init__(self, path: Path, cluster: str | None = None, *, mapped_payload_bytes: int = MAPPED_PAYLOAD_BYTES):
        super().__init__(path, cluster)
        document = restricted_load_mapped(self.path, threshold=mapped_payload_bytes)
        if not isinstance(document, dict):
            raise CheckpointError(str(path), "the pickle does not hold a checkpoint dict.")
        self.embeddings = _require_matrix(document.get("embeddings"), self.path)
        articles = document.get("articles")
        if not isinstance(articles, list):
            raise CheckpointError(str(path), "'articles' is missing or not a list.")
        _check_row_dicts(articles, self.path)
        self.articles: list[dict] = articles
        self._keep = article_mask(articles)
        self.info = self._make_info(
            _read_fields(document, self.path),
            article_rows=int(self._keep.sum()),
            row_count=len(articles),
        )

    def blocks(self, max_rows: int) -> Iterator[RowBlock]:
        for first in range(0, self.info.rows, max_rows):
            last = first + max_rows
            yield DictRowBlock(
                self.embeddings[first:last], self.articles[first:last], self._keep[first:last], self.path, first
            )


class NpyCheckpoint(Checkpoint):
    """A ``.npy`` array (memory-mapped) with its ``.json`` sidecar and ``.jsonl`` rows."""

    def __init__(self, path: Path, cluster: str | None = None):
        super().__init__(path, cluster)
        sidecar = self._read_sidecar()
        self.articles_path = self._articles_path(sidecar)
        self.embeddings = self._map_array()
        self._data_offset = int(self.embeddings.offset)  # type: ignore[attr-defined]
        # numpy.save writes a Fortran-ordered array column by column.
        self.rows_in_file_order = not (self.embeddings.flags.f_contiguous and not self.embeddings.flags.c_contiguous)
        with self._open(self.articles_path) as stream:
            self.lines = index_jsonl(stream, self.articles_path)
        articles = self.lines.rows - len(self.lines.dropped)
        self.info = self._make_info(_read_fields(sidecar, self.sidecar_path), articles, self.lines.rows)

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".json")

    def _open(self, path: Path) -> BinaryIO:
        try:
            return open(path, "rb")
        except OSError as exc:
            raise CheckpointError.unreadable(exc, path) from exc

    def _read_sidecar(self) -> dict:
        with self._open(self.sidecar_path) as stream:
            try:
                sidecar = json.load(stream)
            except ValueError as exc:
                raise CheckpointError(str(self.sidecar_path), f"not JSON ({exc}).") from exc
        if not isinstance(sidecar, dict):
            raise CheckpointError(str(self.sidecar_path), "not a JSON object.")
        return sidecar

    def _articles_path(self, sidecar: dict) -> Path:
        name = articles_file_name(sidecar, self.path)
        if name is None:
            raise CheckpointError(
                str(self.sidecar_path), f"'articles_file' {sidecar.get('articles_file')!r} is not a plain file name."
            )
        return self.path.with_name(name)

    def _map_array(self) -> np.ndarray:
        path = str(self.path)
        size = self.path.stat().st_size
        with self._open(self.path) as stream:
            try:
                version = npy_format.read_magic(stream)
                read_header = (
                    npy_format.read_array_header_1_0
                    if version == (1, 0)
                    else npy_format.read_array_header_2_0
                )
                shape, fortran_order, dtype = read_header(stream)
            except ValueError as exc:
                raise CheckpointError(path, f"not a valid .npy file ({exc}).") from exc
            data_offset = stream.tell()
        if dtype.hasobject:
            raise CheckpointError(path, "the array holds Python objects, which are refused.")
        if len(shape) != 2:
            raise CheckpointError(path, f"the array has shape {shape}, not (rows, dim).")
        declared = data_offset + math.prod(shape) * dtype.itemsize
        if declared != size:
            raise CheckpointError(
                path,
                f"the header declares shape {shape} ({declared:,} bytes with the header) "
                f"but the file has {size:,} bytes: truncated, padded or lying.",
            )
        try:
            return np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise CheckpointError(path, f"cannot be memory-mapped ({exc}).") from exc

    @property
    def indexed_bytes(self) -> int:
        """How much of the ``.jsonl`` file its index covers: what a merge copies from it."""
        return int(self.lines.line_ends[-1]) if self.lines.rows else 0

    def header_bytes(self) -> bytes:
        """The ``.npy`` header: with the bytes of every block, in order, the whole file

        (when :attr:`rows_in_file_order`)."""
        with self._open(self.path) as stream:
            return stream.read(self._data_offset)

    def article_spans(self) -> Iterator[tuple[int, int, int]]:
        """``(offset, length, line number)`` of each run of consecutive article lines in the ``.jsonl``."""
        start = 0
        for row in self.lines.dropped.tolist():
            if row > start:
                yield self.lines.line_start(start), self.lines.line_start(row) - self.lines.line_start(start), start + 1
            start = row + 1
        if start < self.lines.rows:
            yield self.lines.line_start(start), self.indexed_bytes - self.lines.line_start(start), start + 1

    def blocks(self, max_rows: int) -> Iterator[RowBlock]:
        # Read through one reusable buffer instead of the map: pages of a map
        # count toward the process's resident size until unmapped.
        rows, dim = self.embeddings.shape
        count = min(max_rows, rows)
        # A Fortran-ordered file holds each column whole: a block is one run per column.
        buffer = np.empty((count, dim) if self.rows_in_file_order else (dim, count), dtype=self.embeddings.dtype)
        keep_all = np.ones(rows, dtype=bool)
        keep_all[self.lines.dropped] = False
        with self._open(self.path) as array_stream, self._open(self.articles_path) as rows_stream:
            for first in range(0, rows, max_rows):
                count = min(max_rows, rows - first)
                if self.rows_in_file_order:
                    block = buffer[:count]
                    self._read_array(array_stream.fileno(), block, first * block.itemsize * dim)
                else:
                    block = buffer[:, :count].T
                    for column in range(dim):
                        offset = (column * rows + first) * block.itemsize
                        self._read_array(array_stream.fileno(), buffer[column, :count], offset)
                text_start = self.lines.line_start(first)
                line_ends = self.lines.line_ends[first : first + count] - text_start
                yield JsonLineRowBlock(
                    block,
                    keep_all[first : first + count],
                    functools.partial(self._read_lines, rows_stream.fileno(), text_start, int(line_ends[-1])),
                    line_ends,
                    first + 1,
                    self.articles_path,
                )

    def _read_array(self, fd: int, target: np.ndarray, offset: int) -> None:
        """Fill the contiguous ``target`` from ``offset`` of the array's data."""
        if os.preadv(fd, [as_bytes(target)], self._data_offset + offset) != target.nbytes:
            raise CheckpointError(str(self.path), "the file shrank while it was read.")

    def _read_lines(self, fd: int, offset: int, length: int) -> bytes:
        text = os.pread(fd, length, offset)
        if len(text) != length:
            raise CheckpointError(str(self.articles_path), "the file shrank while it was read.")
        return text


def open_checkpoint(
    path: Path, cluster: str | None = None, *, mapped_payload_bytes: int = MAPPED_PAYLOAD_BYTES
) -> Checkpoint:
    """Open one checkpoint of either format; ``cluster`` defaults to its directory name.

    ``mapped_payload_bytes``: see :class:`LegacyCheckpoint`.
    """
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX:
        return LegacyCheckpoint(path, cluster, mapped_payload_bytes=mapped_payload_bytes)
    if path.suffix == NPY_SUFFIX:
        return NpyCheckpoint(path, cluster)
    raise CheckpointError(str(path), f"unknown checkpoint type (expected {LEGACY_SUFFIX} or {NPY_SUFFIX}).")


def checkpoint_problem(path: Path, name: str) -> str | None:
    """Why the file at ``path``, to stand as the checkpoint file ``name``, is not a readable
    checkpoint; None if it is. ``SyncOptions.check_checkpoint``: a changed remote file replaces
    a verified copy only once it reads as one. A ``.pkl`` is read as the merge reads it; the
    parts of a ``.npy`` checkpoint are files of their own, each checked by its own hash."""
    if not name.endswith(LEGACY_SUFFIX):
        return None
    try:
        LegacyCheckpoint(path, cluster="-")
    except CheckpointError as exc:
        return exc.problem
    return None
