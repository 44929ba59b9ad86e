"""The merged result: written in one pass into a staging area, published atomically, read back.

The merge writes into a :class:`StagingArea` (a hidden directory beside the
output, named after this host and process) through one of two writers, one
per form of ``/work/shared/checkpoint-format.md``:

- :class:`LegacyPickleWriter` for a path ending in ``.pkl`` or ``.pickle``
  (any case, see :func:`is_pickle_output`): the legacy dict
  as one pickle stream, assembled opcode by opcode so that the embeddings'
  bytes have a known place in the file, filled as the rows arrive, while the
  article rows are appended after them; no staged copy of anything;
- :class:`BundleWriter` for any other path: ``embeddings.npy`` (preallocated,
  filled in place), ``articles.jsonl`` or ``articles.parquet``, and
  ``manifest.json``.

Rows are written with ``os.pwrite`` into a file preallocated to its final
size, never through a writable map: page-cache writeback stays asynchronous
and written pages never count in the process's resident set.

Nothing appears at the output path until :func:`publish` renames the staged
result into place; the staging area is removed on any exception, Ctrl-C
included, and one left by a killed merge is removed by the next merge to the
same output. :func:`load` reads either form.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import secrets
import shutil
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Protocol

import numpy as np
import orjson
from numpy.lib import format as npy_format

from .errors import (
    AFTER_MERGE,
    CheckpointError,
    OutputError,
    local_file_error,
    translating_local_errors,
)
from .merging.checkpoints import (
    MAPPED_PAYLOAD_BYTES,
    BackgroundDigest,
    NpyCheckpoint,
    RowBlock,
    python_values,
    restricted_load_mapped,
)

# Compared without case: "X.PKL" and "x.pickle" are pickles too, not bundle folders.
PICKLE_SUFFIXES = (".pkl", ".pickle")
EMBEDDINGS_FILE = "embeddings.npy"
ARTICLES_JSONL = "articles.jsonl"
ARTICLES_PARQUET = "articles.parquet"
MANIFEST_FILE = "manifest.json"
LEGACY_KEYS = (
    "embeddings",
    "articles",
    "total_articles",
    "embedding_dim",
    "model",
    "timestamp",
    "quality_metrics",
    "chunk_info",
)

ArticlesFormat = Literal["jsonl", "parquet"]

# Parquet row groups hold this many articles: the article worker's memory
# stays bounded by one group (see benchmarks/RESULTS-merge.md).
_PARQUET_GROUP_ROWS = 4_096

# Bytes copied through Python (not in the kernel) pass through a buffer of this size.
_COPY_BUFFER_BYTES = 16 << 20


def is_pickle_output(path: Path) -> bool:
    """True when ``path`` names the legacy pickle form, else it names a bundle directory."""
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def parquet_available() -> bool:
    # Found, not imported: pyarrow is imported only by the article worker
    # process, and would add 30 MiB to this one's resident size.
    return importlib.util.find_spec("pyarrow") is not None


# The same on every install: JSON lines keep any row a pipeline writes (a key
# that only some rows have, nested values, mixed types), and need nothing
# beyond the core dependencies. Parquet is asked for by name.
DEFAULT_ARTICLES_FORMAT: ArticlesFormat = "jsonl"


# ------------------------------------------------------------------ staging area

_STAGING_SUFFIX = ".merging"
_PREVIOUS_SUFFIX = ".previous"


def _owner_tag() -> str:
    # Which process owns a staging entry: a later merge removes it once that
    # process is gone. Dots in the host name are kept: the pid is parsed from the right.
    return f"{socket.gethostname()}.{os.getpid()}"


def _owner_is_gone(tag: str) -> bool:
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_staging(output: Path) -> list[Path]:
    """Remove what killed merges to ``output`` left beside it (their process is gone); return it."""
    prefix = f".{output.name}."
    removed = []
    try:
        names = os.listdir(output.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest.endswith(_STAGING_SUFFIX):
            tag = rest[: -len(_STAGING_SUFFIX)].rpartition(".")[0]  # drop mkdtemp's random part
        elif rest.endswith(_PREVIOUS_SUFFIX):
            tag = rest[: -len(_PREVIOUS_SUFFIX)]
        else:
            continue
        if _owner_is_gone(tag):
            shutil.rmtree(output.parent / name, ignore_errors=True)
            removed.append(output.parent / name)
    return removed


def check_output_path(output: Path) -> None:
    """Refuse, before any work, an output path that the merge could not or must not replace."""
    with translating_local_errors(output, "write", AFTER_MERGE):
        if is_pickle_output(output):
            if output.is_dir():
                raise OutputError(str(output), "is a directory; a .pkl or .pickle output must be a file.")
        elif output.exists() or output.is_symlink():
            if not output.is_dir():
                raise OutputError(str(output), "exists and is not a directory; refusing to replace it.")
            if any(output.iterdir()) and not (output / MANIFEST_FILE).is_file():
                raise OutputError(str(output), "is a directory that is not a merged bundle; refusing to replace it.")


def _make_staging_directory(output: Path) -> Path:
    """A new hidden directory beside ``output``, named as :func:`remove_stale_staging` expects.

    Not ``tempfile.mkdtemp``: its 0700 would become the published bundle's
    mode, whatever the umask; ``mkdir(0o777)`` lets the umask decide, as
    for any directory the user makes (a group-readable bundle on a shared
    file system under umask 002).
    """
    while True:
        path = output.parent / f".{output.name}.{_owner_tag()}.{secrets.token_hex(4)}{_STAGING_SUFFIX}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue


class StagingArea:
    """A hidden directory beside the output, removed on leaving unless it was published."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = self.output  # replaced on entry

    def __enter__(self) -> StagingArea:
        check_output_path(self.output)
        with translating_local_errors(self.output, "write", AFTER_MERGE):
            self.output.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.output)
            self.path = _make_staging_directory(self.output)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # After a publish of a bundle the directory has moved away: nothing left.
        shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------ row writers


def _write_at(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data)
    if not view.nbytes:
        return  # no rows (a checkpoint of questions only); an empty array's view cannot be cast
    view = view.cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _read_at(fd: int, buffer: Any, offset: int) -> None:
    """Fill ``buffer`` from ``offset`` of ``fd``."""
    view = memoryview(buffer).cast("B")
    while view:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise OSError(f"the file ended {len(view)} bytes early")
        view, offset = view[count:], offset + count


class _PreallocatedFile:
    """A new file of its final size from the start, written at explicit offsets."""

    def __init__(self, path: Path, size: int, keep_contents: bool = False):
        self.path = path
        # 0o666: the umask decides, as for any file the user makes (group
        # members on a shared file system read it under umask 002).
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if keep_contents else os.O_TRUNC), 0o666)
        try:
            os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise

    def write_at(self, data: Any, offset: int) -> None:
        _write_at(self.fd, data, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ScratchFile:
    """An append-only file in the staging area, for bytes to be copied into the output later.

    The merge reads each legacy checkpoint once, before the output can be
    sized, and leaves here what the output will need of it; :meth:`remove`
    deletes it once copied (a bundle's staging directory becomes the output).
    The first ``start`` bytes are left as a hole, for what precedes the rows
    in an output file that this file may become (see :func:`rows_offset`).
    """

    def __init__(self, path: Path, start: int = 0):
        self.path = path
        # The mode of an output file (see _PreallocatedFile): this one may become the output.
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        self.size = start

    def append(self, data: Any) -> int:
        """Write ``data`` (a contiguous buffer) after everything before it; the offset it starts at."""
        offset = self.size
        _write_at(self.fd, data, offset)
        self.size += memoryview(data).nbytes
        return offset

    def remove(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            self.path.unlink(missing_ok=True)


class EmbeddingsRegion:
    """Where the merged rows go: ``shape`` rows, in order, from ``offset`` of ``file``.

    With a ``digest``, the rows are also hashed, in order, on its worker thread.
    """

    def __init__(
        self, file: _PreallocatedFile, offset: int, shape: tuple[int, int], dtype: np.dtype,
        digest: BackgroundDigest | None = None,
    ):
        self.file = file
        self.offset = offset
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.digest = digest
        self.rows_written = 0
        self.row_bytes = shape[1] * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def append(self, rows: np.ndarray) -> None:
        """Write ``rows`` after the previous ones; they must stay unchanged until :meth:`wait`."""
        if self.rows_written + len(rows) > self.shape[0]:
            raise OutputError(str(self.file.path), "more rows than were planned.")
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.digest is not None:
            self.digest.update(data)
        self.file.write_at(data, self.offset + self.rows_written * self.row_bytes)
        self.rows_written += len(rows)

    def wait(self) -> None:
        """Block until the rows given so far are hashed: their buffer may then be reused."""
        if self.digest is not None:
            self.digest.wait()

    def copy_from(self, source_fd: int, offset: int, rows: int) -> None:
        """Append ``rows`` rows stored back to back, in this region's dtype, from ``offset`` of ``source_fd``."""
        if not rows:
            return
        if self.digest is None:
            if self.rows_written + rows > self.shape[0]:
                raise OutputError(str(self.file.path), "more rows than were planned.")
            target = self.offset + self.rows_written * self.row_bytes
            # Rows written in place before this output existed (LegacyPickleWriter's
            # ``rows_in_place``) are not copied onto themselves.
            if not (offset == target and os.path.samestat(os.fstat(source_fd), os.fstat(self.file.fd))):
                _copy_range(source_fd, self.file.fd, offset, rows * self.row_bytes, target)
            self.rows_written += rows
            return
        # The digest needs the bytes: they pass through one reusable buffer.
        buffer = np.empty((min(rows, max(1, _COPY_BUFFER_BYTES // self.row_bytes)), self.shape[1]), self.dtype)
        for first in range(0, rows, len(buffer)):
            block = buffer[: min(len(buffer), rows - first)]
            _read_at(source_fd, block, offset + first * self.row_bytes)
            self.append(block)
            self.wait()

    def check_complete(self) -> None:
        if self.rows_written != self.shape[0]:
            raise OutputError(str(self.file.path), f"{self.rows_written} rows written, {self.shape[0]} planned.")


def _copy_range(source_fd: int, target_fd: int, offset: int, length: int, target_offset: int | None = None) -> None:
    """Copy ``length`` bytes from ``offset`` of the source to ``target_offset`` of the target
    (None: at the target's file position, which moves on)."""
    # In the kernel where it can: no pass of the bytes through Python.
    while length > 0:
        try:
            copied = os.copy_file_range(source_fd, target_fd, length, offset, target_offset)
        except OSError:
            data = os.pread(source_fd, min(length, _COPY_BUFFER_BYTES), offset)
            copied = os.write(target_fd, data) if target_offset is None else os.pwrite(target_fd, data, target_offset)
        if copied == 0:
            raise OSError(f"the source ended {length} bytes early")
        offset, length = offset + copied, length - copied
        if target_offset is not None:
            target_offset += copied


def _append_copied(stream: BinaryIO, source_fd: int, spans: Iterable[tuple[int, int]]) -> None:
    """Append the ``(offset, length)`` spans of ``source_fd`` to ``stream``, copied in the kernel."""
    stream.flush()
    for offset, length in spans:
        _copy_range(source_fd, stream.fileno(), offset, length)
    # The kernel moved the file position past the stream's idea of it.
    stream.seek(0, os.SEEK_END)


class _AppendedArticles:
    """Articles appended to one stream as bytes: from row blocks, or already encoded elsewhere.

    A merge encodes the rows of a legacy checkpoint with :meth:`encode` as
    soon as it has read them (the output cannot be opened yet), and the
    bytes are copied in later with :meth:`add_encoded`.
    """

    # True: takes the article lines of a ``.jsonl`` checkpoint as they are
    # (:meth:`add_lines`), not its row blocks (:meth:`add`).
    takes_lines = False
    _stream: BinaryIO

    @staticmethod
    def encode(block: RowBlock) -> bytes:
        """The bytes that :meth:`add` appends for ``block``."""
        raise NotImplementedError

    def add(self, block: RowBlock) -> None:
        self._stream.write(self.encode(block))

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        """Append ``length`` bytes made by :meth:`encode` from the rows of ``source``, at ``offset`` of ``scratch``."""
        _append_copied(self._stream, scratch.fd, [(offset, length)])


def _json_lines(block: RowBlock) -> bytes:
    return b"".join(block.article_lines())


class JsonlArticles(_AppendedArticles):
    """``articles.jsonl``: one article per line, lines of ``.jsonl`` checkpoints copied verbatim.

    Nothing here parses them: the merge has every checkpoint line checked
    by the article worker (``merging/article_worker.py``) before it publishes.
    """

    takes_lines = True
    encode = staticmethod(_json_lines)

    def __init__(self, path: Path):
        self.path = path
        self._stream = open(path, "wb")

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        """Copy the article lines of ``checkpoint`` as they are, in the kernel."""
        with open(checkpoint.articles_path, "rb") as source:
            _append_copied(self._stream, source.fileno(), [span[:2] for span in checkpoint.article_spans()])
        if not checkpoint.lines.ends_with_newline and checkpoint.lines.rows - 1 not in checkpoint.lines.dropped:
            self._stream.write(b"\n")

    def close(self) -> None:
        self._stream.close()

    finish = close


class _ArticleWorker(Protocol):
    # article_worker.ArticleWorker, which imports this module.
    def write_parquet(self, path: Path, group_rows: int) -> None: ...
    def submit(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None: ...
    def finish(self) -> None: ...


class ParquetArticles:
    """``articles.parquet``, parsed and written by the article worker process from the lines it is sent.

    The merge process hands over byte spans of JSON lines (the article
    lines of ``.jsonl`` checkpoints, and legacy checkpoints' rows, which wait
    in the staging area as JSON lines); it never imports pyarrow.
    """

    takes_lines = True
    encode = staticmethod(_json_lines)

    def __init__(self, path: Path, worker: _ArticleWorker):
        self.path = path
        self._worker = worker
        worker.write_parquet(path, _PARQUET_GROUP_ROWS)

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        self._worker.submit(checkpoint.articles_path, checkpoint.article_spans())

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        self._worker.submit(scratch.path, [(offset, length, 1)], source)

    def finish(self) -> None:
        """Wait until the worker has written and closed the file; raise what went wrong there."""
        self._worker.finish()

    def close(self) -> None:
        pass  # after a failure, the merge stops the worker: nothing to wait for


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


class _NumpyScalarFound(Exception):
    pass


class _PlainValuesPickler(pickle.Pickler):
    # Still the C pickler: it asks reducer_override only about objects that
    # are not plain Python values, so rows without numpy scalars cost nothing more.
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.generic):
            raise _NumpyScalarFound
        return NotImplemented


def _pickle_body(value: Any) -> bytes:
    """The opcodes that push ``value``, without the protocol header and STOP.

    Protocol 3 has no frames, so such bodies can be laid end to end inside
    a larger stream; no memo (``fast``), so none refers to another. A numpy
    scalar in ``value`` is written as the Python scalar of its value, as a
    bundle's JSON has it: the output loads the same under any numpy, and an
    ``np.int64`` id stays an ``int``.
    """
    stream = io.BytesIO()
    pickler = _PlainValuesPickler(stream, protocol=3)
    pickler.fast = True  # also several times faster on many small dicts
    try:
        pickler.dump(value)
    except _NumpyScalarFound:
        return _pickle_body(python_values(value))
    data = stream.getvalue()
    return data[2:-1]


class _PickledArticles(_AppendedArticles):
    """The article list of the legacy pickle: APPENDS batches written after an EMPTY_LIST."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._stream.write(pickle.EMPTY_LIST)

    @staticmethod
    def encode(block: RowBlock) -> bytes:
        rows = block.article_rows()
        # A pickled list's body is EMPTY_LIST then its APPEND(S): without the
        # EMPTY_LIST, the rows append to the list already on the stack.
        return _pickle_body(rows)[1:] if rows else b""

    def close(self) -> None:
        pass


# The rows' bytes are memo entry 0 of the legacy pickle; nothing else in it is memoized.
_ROWS_MEMO = bytes([0])

# The legacy pickle's rows start at a multiple of this in the file: mapped by
# load(), they are then aligned for any float dtype (an unaligned array is
# copied by many numpy and BLAS operations).
_ROWS_ALIGNMENT = 64


def _legacy_pickle_head(nbytes: int) -> bytes:
    """The legacy pickle up to its ``nbytes`` of rows, which follow; its length does not depend on ``nbytes``.

    The rows come first, as one bytes payload: the array made of them can be
    described only once its shape is known (see :func:`_legacy_pickle_array`).
    """
    start = pickle.PROTO + bytes([4])  # BINBYTES8, for rows beyond 4 GiB
    rows = pickle.BINBYTES8 + struct.pack("<Q", nbytes)
    # Padding that puts the rows at their alignment: a bytes value, pushed and dropped.
    padding = -(len(start) + 3 + len(rows)) % _ROWS_ALIGNMENT
    return start + pickle.SHORT_BINBYTES + bytes([padding]) + bytes(padding) + pickle.POP + rows


def _legacy_pickle_array(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """What follows the rows: they are memoized and dropped, then the dict opens with the array made of them.

    The array is rebuilt as ``ndarray.__reduce_ex__(4)`` describes one
    (``_reconstruct``, then ``__setstate__`` with the raw bytes), a form that
    numpy 1.x and 2.x both load; protocol 5's ``_frombuffer`` is named
    ``numpy._core.numeric`` by numpy 2, a module numpy 1.x does not have.
    Every name is the installed numpy's own; only the shape and the bytes are ours.
    """
    template = np.empty((0, shape[1]), dtype)
    reconstruct, arguments, (version, _, state_dtype, fortran_order, _) = template.__reduce_ex__(4)
    return b"".join(
        [
            pickle.BINPUT + _ROWS_MEMO,
            pickle.POP,
            pickle.EMPTY_DICT,
            pickle.MARK,
            _pickle_body("embeddings"),
            _pickle_body(reconstruct),
            _pickle_body(arguments),
            pickle.REDUCE,
            pickle.MARK,
            _pickle_body(version),
            _pickle_body(tuple(int(size) for size in shape)),
            _pickle_body(state_dtype),
            _pickle_body(fortran_order),
            pickle.BINGET + _ROWS_MEMO,
            pickle.TUPLE,
            pickle.BUILD,
        ]
    )


def rows_offset(output: Path) -> int | None:
    """Where the rows start in the file of the output at ``output``, known before its size is.

    A ``.pkl`` output's rows may be written there in place, ahead of the
    output itself (see :class:`LegacyPickleWriter`). None for a bundle: its
    rows are hashed in file order as they are written, after its header.
    """
    return len(_legacy_pickle_head(0)) if is_pickle_output(output) else None


class LegacyPickleWriter:
    """The legacy dict, one pickle stream written in one pass, loadable with plain ``pickle.load``.

    Layout (protocol 4, no frames)::

        <padding> BINBYTES8 <rows> -> memo 0
        {'embeddings': _reconstruct(ndarray, (0,), b'b') + __setstate__((1, shape, dtype, False, memo 0)),
         'articles': [APPENDS batches ...], 'total_articles': ..., ...}

    which is what ``pickle.dump`` of the legacy merge's array gave (protocol
    4), so it loads as a writable ndarray as that one did, under numpy 1.x
    and 2.x alike. The array bytes sit at a known offset: rows are written
    there as they come while the articles are appended after the array, so
    nothing is staged twice.

    ``rows_in_place`` names a file that already holds every row, in order,
    from :func:`rows_offset` to its end: it becomes this output, and only
    what precedes and follows the rows is written.
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, rows_in_place: Path | None = None):
        dtype = np.dtype(dtype)
        self.path = path
        nbytes = shape[0] * shape[1] * dtype.itemsize
        head = _legacy_pickle_head(nbytes)
        tail = _legacy_pickle_array(shape, dtype)
        if rows_in_place is not None:
            os.replace(rows_in_place, path)
        self._file = _PreallocatedFile(path, len(head) + nbytes, keep_contents=rows_in_place is not None)
        self._file.write_at(head, 0)
        self.embeddings = EmbeddingsRegion(self._file, len(head), shape, dtype)
        self._stream = open(path, "r+b")
        self._stream.seek(len(head) + nbytes)
        self._stream.write(tail + _pickle_body("articles"))
        self.articles = _PickledArticles(self._stream)

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Write the remaining keys (every legacy key but the first two) and close."""
        self.embeddings.check_complete()
        for key in LEGACY_KEYS[2:]:
            self._stream.write(_pickle_body(key) + _pickle_body(metadata[key]))
        self._stream.write(pickle.SETITEMS + pickle.STOP)
        self.close()

    def close(self) -> None:
        self._stream.close()
        self._file.close()


class BundleWriter:
    """The bundle's files in the staging directory: preallocated ``embeddings.npy``, articles, manifest."""

    def __init__(
        self, directory: Path, shape: tuple[int, int], dtype: np.dtype, articles_format: ArticlesFormat,
        worker: _ArticleWorker | None = None,
    ):
        dtype = np.dtype(dtype)
        self.directory = directory
        header = io.BytesIO()
        npy_format.write_array_header_1_0(
            header, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        )
        # If the disk is full already, the digest's thread and the file go with the error.
        with ExitStack() as undo:
            self._digest = undo.enter_context(BackgroundDigest())
            self._digest.update(header.getvalue())
            self._file = _PreallocatedFile(directory / EMBEDDINGS_FILE, len(header.getvalue()) + shape[0] * shape[1] * dtype.itemsize)
            undo.callback(self._file.close)
            self._file.write_at(header.getvalue(), 0)
            self.embeddings = EmbeddingsRegion(self._file, len(header.getvalue()), shape, dtype, self._digest)
            self.articles_file = ARTICLES_PARQUET if articles_format == "parquet" else ARTICLES_JSONL
            self.articles: JsonlArticles | ParquetArticles = (
                ParquetArticles(directory / self.articles_file, worker)
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


OutputWriter = LegacyPickleWriter | BundleWriter


def bundle_articles_format(output: Path, articles_format: ArticlesFormat | None = None) -> ArticlesFormat | None:
    """The form of the articles of a bundle at ``output`` (None for a ``.pkl`` output).

    ``None`` asks for the default, :data:`DEFAULT_ARTICLES_FORMAT`;
    parquet without pyarrow is refused.
    """
    if is_pickle_output(output):
        return None
    if articles_format is None:
        return DEFAULT_ARTICLES_FORMAT
    if articles_format == "parquet" and not parquet_available():
        raise OutputError(str(output), "articles.parquet needs pyarrow, which is not installed: "
                                       "pip install 'async_embed_sync[parquet]', or leave out "
                                       "--articles-format for articles.jsonl.")
    return articles_format


def copies_checkpoint_lines(output: Path, articles_format: ArticlesFormat | None = None) -> bool:
    """True when the output at ``output`` takes the lines of ``.jsonl`` checkpoints verbatim, unparsed.

    Only a bundle's ``articles.jsonl`` does: a ``.pkl`` output reads each
    article row as a dict, and the article worker parses every row that
    goes into ``articles.parquet``.
    """
    return bundle_articles_format(output, articles_format) == "jsonl"


def articles_encoder(output: Path, articles_format: ArticlesFormat | None = None) -> Callable[[RowBlock], bytes]:
    """How the output at ``output`` encodes the article rows of a block, for its ``add_encoded``."""
    articles_format = bundle_articles_format(output, articles_format)
    return _PickledArticles.encode if articles_format is None else _json_lines


def open_output(
    staging: StagingArea, shape: tuple[int, int], dtype: np.dtype, articles_format: ArticlesFormat | None = None,
    rows_in_place: Path | None = None, worker: _ArticleWorker | None = None,
) -> OutputWriter:
    """The writer for the form that the output path asks for, writing into ``staging``.

    ``rows_in_place``: see :class:`LegacyPickleWriter`; only for a ``.pkl``
    output. ``worker``: the article worker, which writes parquet articles.
    """
    articles_format = bundle_articles_format(staging.output, articles_format)
    if articles_format is None:
        return LegacyPickleWriter(staging.path / staging.output.name, shape, dtype, rows_in_place)
    if rows_in_place is not None:
        raise ValueError("a bundle's rows are never written in place")
    if articles_format == "parquet" and worker is None:
        raise ValueError("parquet articles are written by an article worker")
    return BundleWriter(staging.path, shape, dtype, articles_format, worker)


def _replace_directory(source: Path, target: Path) -> None:
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.{_owner_tag()}{_PREVIOUS_SUFFIX}")
        os.replace(target, previous)
    os.replace(source, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def publish(staging: StagingArea) -> None:
    """Rename the finished result in ``staging`` into place, atomically."""
    output = staging.output
    check_output_path(output)  # the path may have changed while the merge ran
    with translating_local_errors(output, "write", AFTER_MERGE):
        if is_pickle_output(output):
            os.replace(staging.path / output.name, output)
        else:
            _replace_directory(staging.path, output)


# ------------------------------------------------------------------------- load


def _read_articles(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    with open(path, "rb") as stream:
        return [orjson.loads(line) for line in stream]


def _load_bundle(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        embeddings = np.load(path / manifest.get("embeddings_file", EMBEDDINGS_FILE), mmap_mode="r", allow_pickle=False)
        articles = _read_articles(path / manifest.get("articles_file", ARTICLES_JSONL))
    except (OSError, ValueError, ImportError) as exc:
        raise OutputError(str(path), f"is not a readable merged bundle ({exc}).") from exc
    return {"embeddings": embeddings, "articles": articles, **{key: manifest.get(key) for key in LEGACY_KEYS[2:]}}


# A payload at least this large is mapped from the file, not read.
_MAPPED_PAYLOAD_BYTES = MAPPED_PAYLOAD_BYTES


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a merged result, either form, as the legacy dict.

    A bundle's embeddings are memory-mapped read-only; a pickle's are
    memory-mapped copy-on-write (writable, changes stay in memory), read
    through the same restricted unpickler as the checkpoints.
    """
    path = Path(path)
    if path.is_dir():
        document = _load_bundle(path)
    else:
        try:
            # Copy-on-write: writable, as the legacy merge's array was, and the file stays as it is.
            document = restricted_load_mapped(path, mode="c", threshold=_MAPPED_PAYLOAD_BYTES)
        except CheckpointError as exc:
            raise OutputError(str(path), exc.problem) from exc
    if not isinstance(document, dict) or set(document) != set(LEGACY_KEYS):
        raise OutputError(str(path), "does not hold a merged result (unexpected keys).")
    rows = len(document["embeddings"])
    if not rows == len(document["articles"]) == document["total_articles"]:
        raise OutputError(
            str(path),
            f"{rows} embedding rows, {len(document['articles'])} articles and "
            f"total_articles {document['total_articles']} disagree.",
        )
    return document
