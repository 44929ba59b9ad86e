"""Find and open embedding checkpoints of both formats as uniform shards.

A checkpoint is untrusted input: it came over the network from a shared
machine. Legacy ``.pkl`` checkpoints go through :class:`RestrictedUnpickler`,
which rebuilds numpy arrays, dtypes and plain containers and refuses every
other global before anything runs. ``.npy`` checkpoints are opened with
``numpy.load(..., mmap_mode="r", allow_pickle=False)`` after their header has
been checked against the file size.

Each opened checkpoint is checked for internal consistency (a 2-D array, as
many rows as its index range spans and as its article list holds); anything
wrong raises :class:`CheckpointError` naming the file. Rules that involve
several checkpoints, or merge policy, belong to ``merging/merge.py``.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import pickle
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
from numpy.lib import format as npy_format

from ..errors import CheckpointError, UnsafePickleError, os_error_problem

LEGACY_SUFFIX = ".pkl"
NPY_SUFFIX = ".npy"
ARTICLE_KIND = "article"

# Whatever can go wrong inside an unpickler fed hostile or torn bytes, short of
# our own refusals: a truncated stream, a bad opcode argument, a REDUCE whose
# allowed callable rejects its arguments, an absurd allocation.
_UNPICKLING_FAILURES = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    UnicodeDecodeError,
    MemoryError,
)


def is_article(row: Mapping[str, Any]) -> bool:
    """A row is an article unless its ``kind`` says otherwise."""
    return row.get("kind", ARTICLE_KIND) == ARTICLE_KIND


def as_bytes(data: Any) -> Any:
    """The bytes of a C-contiguous array as a flat uint8 view (never a copy); any other ``data`` as it is.

    The buffer protocol refuses some dtypes (a big-endian longdouble); a view as uint8 does not.
    """
    if not isinstance(data, np.ndarray):
        return data
    if not data.flags.c_contiguous:
        raise ValueError("not a C-contiguous array")  # its copy would be read into, or hashed, instead
    return data.view(np.uint8).reshape(-1)


class BackgroundDigest:
    """A sha256 fed in order on a worker thread, so that hashing overlaps other work.

    hashlib releases the GIL on large buffers: the hashing runs on another
    core while the caller copies and measures. A buffer passed to
    :meth:`update` must stay unchanged until :meth:`wait` returns.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._worker = ThreadPoolExecutor(max_workers=1)
        self._pending: list[Future[None]] = []

    def update(self, data: Any) -> None:
        self._pending.append(self._worker.submit(self._digest.update, as_bytes(data)))

    def wait(self) -> None:
        """Block until every buffer given so far is hashed."""
        pending, self._pending = self._pending, []
        for update in pending:
            update.result()

    def hexdigest(self) -> str:
        self.wait()
        self._worker.shutdown()
        return self._digest.hexdigest()

    def close(self) -> None:
        """Give up: drop what is not hashed yet and stop the worker (its thread is joined)."""
        for update in self._pending:
            update.cancel()
        self._worker.shutdown(wait=True)

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def find_checkpoints(download_dir: Path) -> list[Path]:
    """Every checkpoint under ``<download_dir>/<cluster>/``, sorted by path.

    Hidden entries are skipped: the downloader keeps its partial files and
    journal under a dot-directory.
    """
    found: list[Path] = []
    for cluster_dir in sorted(Path(download_dir).iterdir()):
        if cluster_dir.name.startswith(".") or not cluster_dir.is_dir():
            continue
        for path in sorted(cluster_dir.iterdir()):
            if path.suffix in (LEGACY_SUFFIX, NPY_SUFFIX) and not path.name.startswith("."):
                if path.is_file():
                    found.append(path)
    return found


# ------------------------------------------------------------ restricted unpickler


class _RefusedContent(pickle.UnpicklingError):
    """An allowed constructor was asked for something we do not accept."""


def _reconstruct(subtype: type, shape: tuple[int, ...], dtype_code: Any) -> np.ndarray:
    # numpy's own ``_reconstruct`` would build any ndarray subclass named in
    # the stream; only the base class is accepted.
    if subtype is not np.ndarray:
        raise _RefusedContent(f"an array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _frombuffer(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    if np.dtype(dtype).hasobject:
        raise _RefusedContent("an object array")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# numpy's own scalar constructor, whichever module this numpy keeps it in.
_numpy_scalar = np.int64(0).__reduce__()[0]


def _scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    # Only an object scalar's second argument is not its bytes.
    if np.dtype(dtype).hasobject or not isinstance(data, bytes):
        raise _RefusedContent("an object scalar")
    return _numpy_scalar(dtype, data)


def _empty_bytes(*arguments: Any) -> bytes:
    # Protocol 2 writes b"" as a call to bytes() without arguments; bytes(n) would allocate n bytes.
    if arguments:
        raise _RefusedContent("bytes built from arguments")
    return b""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Protocol 2 carries bytes as latin-1 text plus a call to _codecs.encode.
    if encoding.lower().replace("-", "") != "latin1":
        raise _RefusedContent(f"bytes in encoding {encoding!r}")
    return text.encode("latin-1")


def _numpy_names(name: str, value: Callable[..., Any], *modules: str) -> dict[tuple[str, str], Any]:
    return {(module, name): value for module in modules}


# numpy 2 pickles name ``numpy._core``; numpy 1.x pickles name ``numpy.core``.
# Protocol 2 pickles written by Python 3 name builtins ``__builtin__``.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_names("_reconstruct", _reconstruct, "numpy._core.multiarray", "numpy.core.multiarray"),
    **_numpy_names("scalar", _scalar, "numpy._core.multiarray", "numpy.core.multiarray"),
    **_numpy_names("_frombuffer", _frombuffer, "numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    **{(module, "bytes"): _empty_bytes for module in ("builtins", "__builtin__")},
    ("datetime", "datetime"): datetime.datetime,
    **{
        (module, container.__name__): container
        for module in ("builtins", "__builtin__")
        for container in (list, dict, set, frozenset, bytearray)
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global."""

    def __init__(self, stream: BinaryIO, source: Path):
        super().__init__(stream)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(str(self.source), f"{module}.{name}") from None


def restricted_load(
    path: Path, unpickler: Callable[[BinaryIO, Path], RestrictedUnpickler] = RestrictedUnpickler
) -> Any:
    """Unpickle ``path`` safely; :class:`CheckpointError` names the file on any failure.

    ``unpickler`` builds the unpickler from the open file and its path: a
    subclass of :class:`RestrictedUnpickler` may change how allowed objects
    are rebuilt, never what is allowed.
    """
    try:
        with open(path, "rb") as stream:
            return unpickler(stream, path).load()
    except UnsafePickleError:
        raise
    except _RefusedContent as exc:
        raise CheckpointError(str(path), f"the pickle holds {exc}, which is refused.") from exc
    except _UNPICKLING_FAILURES as exc:
        raise CheckpointError(
            str(path), f"not a readable pickle (truncated or corrupt: {exc!r})."
        ) from exc
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read: {os_error_problem(exc, path)}") from exc


# A payload (the bytes of an array) at least this large is mapped from the file, not read.
MAPPED_PAYLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class _SkippedPayload:
    address: int  # where in memory the unpickler wanted the bytes
    length: int
    offset: int  # where they are in the file


class _PayloadSkippingReader:
    """A file for the unpickler that leaves large ``readinto`` requests unfilled, noting where they were.

    The unpickler reads a large bytes or bytearray payload (an array's data)
    with one ``readinto`` into a fresh buffer: left unfilled, the buffer's
    pages are never touched, and cost neither memory nor a copy.
    """

    def __init__(self, stream: BinaryIO, threshold: int):
        self._stream = stream
        self._threshold = threshold
        self.read = stream.read
        self.readline = stream.readline
        self.peek = getattr(stream, "peek", None) or (lambda size=0: b"")
        self.skipped: list[_SkippedPayload] = []

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if view.nbytes < self._threshold:
            return self._stream.readinto(buffer)
        position = self._stream.tell()
        end = self._stream.seek(0, os.SEEK_END)
        self._stream.seek(min(position + view.nbytes, end))
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        self.skipped.append(_SkippedPayload(address, view.nbytes, position))
        return min(view.nbytes, end - position)


def _mapped(array: np.ndarray, payload: _SkippedPayload, path: Path, mode: str) -> np.ndarray | None:
    """``array`` mapped from ``path`` if ``payload`` holds the end of its bytes, else None.

    The unpickler may have buffered the first bytes of the payload already
    (they were copied into the array): they precede the skipped ones in the file.
    """
    buffered = payload.address - array.ctypes.data
    if not array.flags.c_contiguous or buffered < 0 or buffered + payload.length != array.nbytes:
        return None
    data = np.memmap(path, dtype=np.uint8, mode=mode, offset=payload.offset - buffered, shape=(array.nbytes,))
    return np.frombuffer(data, dtype=array.dtype).reshape(array.shape)


def restricted_load_mapped(path: Path, mode: str = "r", threshold: int | None = None) -> Any:
    """:func:`restricted_load` of a dict whose large ``embeddings`` array is mapped from the file, not read.

    Reading an array's bytes costs a copy into fresh memory (most of the
    time of loading a checkpoint); a map costs neither. ``mode`` is that of
    :class:`numpy.memmap` ("r": read-only, "c": copy-on-write). A payload of
    ``threshold`` bytes or more (default :data:`MAPPED_PAYLOAD_BYTES`) is
    left unread; if one is not the embeddings', its bytes are missing, and
    the file is read again, whole.
    """
    readers: list[_PayloadSkippingReader] = []

    def unpickler(stream: BinaryIO, source: Path) -> RestrictedUnpickler:
        readers.append(_PayloadSkippingReader(stream, MAPPED_PAYLOAD_BYTES if threshold is None else threshold))
        return RestrictedUnpickler(readers[-1], source)  # type: ignore[arg-type]

    document = restricted_load(path, unpickler)
    skipped = readers[0].skipped
    if not skipped:
        return document
    embeddings = document.get("embeddings") if isinstance(document, dict) else None
    try:
        mapped = (
            _mapped(embeddings, skipped[0], path, mode)
            if len(skipped) == 1 and isinstance(embeddings, np.ndarray)
            else None
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(path), f"cannot be memory-mapped ({exc}).") from exc
    if mapped is None:
        return restricted_load(path)
    document["embeddings"] = mapped
    return document


# ------------------------------------------------------------------ uniform shards


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


# The key "kind", each letter possibly escaped: a line without a match has no
# "kind" key, so it is an article and need not be parsed again to be kept.
_KIND_KEY = re.compile(rb'"(?:k|\\u006[bB])(?:i|\\u0069)(?:n|\\u006[eE])(?:d|\\u0064)"')

def _parse_jsonl_row(line: bytes, number: int, path: Path) -> dict:
    # orjson: about 4x the speed of ``json`` on article rows, and strict
    # (UTF-8 only, no NaN or Infinity literals, which are not JSON).
    try:
        row = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(str(path), f"line {number} is not JSON ({exc}).") from exc
    if not isinstance(row, dict):
        raise CheckpointError(str(path), f"line {number} is not a JSON object.")
    return row


class RowBlock(ABC):
    """Consecutive rows of one checkpoint: their vectors, which are articles, and their rows."""

    def __init__(self, embeddings: np.ndarray, keep: np.ndarray):
        self.embeddings = embeddings
        self.keep = keep

    @abstractmethod
    def article_rows(self) -> list[dict]:
        """The article rows as dicts."""

    @abstractmethod
    def article_lines(self) -> list[bytes]:
        """The article rows as JSON lines."""


def _article_mask(rows: list[dict]) -> np.ndarray:
    return np.fromiter(map(is_article, rows), dtype=bool, count=len(rows))


def python_scalar(value: Any) -> Any:
    """The Python scalar of a numpy scalar's value (``np.int64(7)`` is ``7``); TypeError for anything else."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"Type is not JSON serializable: {type(value).__name__}")


def python_values(value: Any) -> Any:
    """``value`` with every numpy scalar in it, however deep, replaced by the Python scalar of its value."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {python_values(key): python_values(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return type(value)(map(python_values, value))
    return value


# Non-string keys become strings, as the json module writes them.
_JSON_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


class DictRowBlock(RowBlock):
    """Rows that were loaded as dicts (legacy pickles); ``keep`` if already known, else from the rows.

    ``first_row`` is the index of the first row in the article list of
    ``path``, the checkpoint named in errors.
    """

    def __init__(self, embeddings: np.ndarray, rows: list[dict], keep: np.ndarray | None = None,
                 path: Path | None = None, first_row: int = 0):
        super().__init__(embeddings, _article_mask(rows) if keep is None else keep)
        self._rows = rows
        self._path = path
        self._first_row = first_row

    def article_rows(self) -> list[dict]:
        return [row for row, kept in zip(self._rows, self.keep) if kept]

    def article_lines(self) -> list[bytes]:
        """The article rows as strict JSON: numpy scalars as their Python value, NaN and Infinity as null.

        A value that JSON cannot hold (bytes, a string with a lone
        surrogate, an integer beyond 64 bits...) is a :class:`CheckpointError`
        naming the checkpoint and the row.
        """
        lines = []
        for offset in np.flatnonzero(self.keep).tolist():
            try:
                lines.append(orjson.dumps(self._rows[offset], default=python_scalar, option=_JSON_LINE))
            except orjson.JSONEncodeError as exc:
                raise CheckpointError(
                    str(self._path),
                    f"articles[{self._first_row + offset}] cannot be written as JSON ({exc}); "
                    f"a .pkl output keeps any value that a checkpoint holds.",
                ) from exc
        return lines


class JsonLineRowBlock(RowBlock):
    """Rows still in their JSON lines (``.jsonl``): read only if asked for, parsed only as dicts.

    ``read_text`` returns the block's lines back to back; ``line_ends`` is
    the end of each line in them.
    """

    def __init__(self, embeddings: np.ndarray, keep: np.ndarray, read_text: Callable[[], bytes],
                 line_ends: np.ndarray, first_line: int, path: Path):
        super().__init__(embeddings, keep)
        self._read_text = read_text
        self._text: bytes | None = None
        self._line_ends = line_ends
        self._first_line = first_line
        self._path = path

    def _line(self, offset: int) -> bytes:
        # Read only when asked: a bundle copies the lines in the kernel instead.
        if self._text is None:
            self._text = self._read_text()
        start = int(self._line_ends[offset - 1]) if offset else 0
        return self._text[start : int(self._line_ends[offset])]

    def article_rows(self) -> list[dict]:
        return [
            _parse_jsonl_row(self._line(offset), self._first_line + offset, self._path)
            for offset in np.flatnonzero(self.keep).tolist()
        ]

    def article_lines(self) -> list[bytes]:
        lines = [self._line(offset) for offset in np.flatnonzero(self.keep).tolist()]
        return [line if line.endswith(b"\n") else line + b"\n" for line in lines]


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
        self.cluster = cluster if cluster is not None else self.path.parent.name

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
    """A legacy pickle, loaded whole (through the restricted unpickler), its array mapped read-only."""

    def __init__(self, path: Path, cluster: str | None = None):
        super().__init__(path, cluster)
        document = restricted_load_mapped(self.path)
        if not isinstance(document, dict):
            raise CheckpointError(str(path), "the pickle does not hold a checkpoint dict.")
        self.embeddings = _require_matrix(document.get("embeddings"), self.path)
        articles = document.get("articles")
        if not isinstance(articles, list):
            raise CheckpointError(str(path), "'articles' is missing or not a list.")
        _check_row_dicts(articles, self.path)
        self.articles: list[dict] = articles
        self._keep = _article_mask(articles)
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


# The ``.jsonl`` of a checkpoint is read this much at a time when it is indexed.
_JSONL_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class JsonlIndex:
    """Where each line of a ``.jsonl`` file ends, and which rows are not articles.

    Built without parsing the lines that need no parsing to be counted: a
    line whose bytes hold no ``"kind"`` key (however escaped) is an article,
    and a line that starts with ``{`` and ends with ``}`` is taken to be a
    JSON object. Every other line is parsed here, and refused if it is not a
    JSON object. The lines taken on trust are still parsed before a merge
    publishes anything: where the row is read as a dict (a ``.pkl``
    output), or by :func:`parse_jsonl_span` in the article worker process
    (a bundle's articles).
    """

    line_ends: np.ndarray  # int64: the offset just after each line, its newline included
    dropped: np.ndarray  # int64: the rows that are not articles, ascending
    ends_with_newline: bool

    @property
    def rows(self) -> int:
        return len(self.line_ends)

    def line_start(self, row: int) -> int:
        return int(self.line_ends[row - 1]) if row else 0


def _line_ends(text: bytes, size: int) -> list[int]:
    """Where each line of ``text[:size]`` ends; the last one may lack its newline."""
    # bytes.find is a memchr: faster here than numpy's compare and nonzero.
    ends, find, at = [], text.find, text.find(b"\n", 0, size)
    while at >= 0:
        ends.append(at + 1)
        at = find(b"\n", at + 1, size)
    if size and (not ends or ends[-1] != size):
        ends.append(size)
    return ends


def _rows_needing_a_parse(text: bytes, ends: np.ndarray) -> set[int]:
    """Rows of ``text[:ends[-1]]`` that may carry a ``kind`` key, or may not be a JSON object."""
    data = np.frombuffer(text, dtype=np.uint8, count=int(ends[-1]))
    starts = np.concatenate(([0], ends[:-1]))
    last = ends - 1 - (data[ends - 1] == ord("\n"))  # the last byte before the newline
    filled = last >= starts
    looks_like_object = np.zeros(len(ends), dtype=bool)
    looks_like_object[filled] = (data[starts[filled]] == ord("{")) & (data[last[filled]] == ord("}"))
    rows = set(np.flatnonzero(~looks_like_object).tolist())
    for match in _KIND_KEY.finditer(text, 0, int(ends[-1])):
        rows.add(int(np.searchsorted(ends, match.start(), side="right")))
    return rows


def _whole_line_chunks(
    stream: BinaryIO, limit: int | None = None, chunk_bytes: int = _JSONL_CHUNK_BYTES
) -> Iterator[tuple[bytes, int]]:
    """``(text, cut)`` pairs: ``text[:cut]`` is the next run of whole lines of ``stream``.

    Reads ``chunk_bytes`` at a time, at most ``limit`` bytes if given; the
    very last line may lack its newline.
    """
    carry = b""
    remaining = math.inf if limit is None else limit
    while True:
        chunk = stream.read(min(chunk_bytes, remaining)) if remaining else b""
        remaining -= len(chunk)
        text = carry + chunk if carry else chunk
        # Whole lines only; a partial last line waits for the next chunk.
        cut = text.rfind(b"\n") + 1 if chunk else len(text)
        carry = text[cut:]
        if cut:
            yield text, cut
        if not chunk:
            return


def index_jsonl(stream: BinaryIO, path: Path) -> JsonlIndex:
    """Index the lines of ``stream``; :class:`CheckpointError` for a line that is not a JSON object."""
    line_ends: list[np.ndarray] = []
    dropped: list[int] = []
    base = rows = 0
    last = b""
    for text, cut in _whole_line_chunks(stream):
        last = text[cut - 1 : cut]
        ends = np.array(_line_ends(text, cut), dtype=np.int64)
        for offset in sorted(_rows_needing_a_parse(text, ends)):
            start = int(ends[offset - 1]) if offset else 0
            row = _parse_jsonl_row(text[start : int(ends[offset])], rows + offset + 1, path)
            if not is_article(row):
                dropped.append(rows + offset)
        line_ends.append(ends + base)
        base += cut
        rows += len(ends)
    return JsonlIndex(
        line_ends=np.concatenate(line_ends) if line_ends else np.zeros(0, np.int64),
        dropped=np.array(dropped, dtype=np.int64),
        ends_with_newline=last in (b"", b"\n"),
    )


# Spans are parsed this much at a time: the parser runs in a worker process
# (see ``merging/article_worker.py``) whose resident size adds to the merge's, and
# larger reads parse no faster.
_PARSE_CHUNK_BYTES = 1 << 20


def parse_jsonl_span(path: Path, offset: int, length: int, first_line: int, source: Path | None = None) -> Iterator[list[dict]]:
    """The rows of the whole lines in ``length`` bytes of ``path`` from ``offset``, a list per chunk read.

    Every line is parsed: :class:`CheckpointError` naming ``source``
    (default ``path``) and the line (numbered from ``first_line``) for a
    line that is not a JSON object, or if the file is shorter than the span.
    """
    source = source or path
    number = first_line
    parsed = 0
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            for text, cut in _whole_line_chunks(stream, length, _PARSE_CHUNK_BYTES):
                view, start, rows = memoryview(text), 0, []
                for end in _line_ends(text, cut):
                    rows.append(_parse_jsonl_row(view[start:end], number, source))
                    number += 1
                    start = end
                parsed += cut
                yield rows
    except OSError as exc:
        raise CheckpointError(str(source), f"cannot be read: {os_error_problem(exc, path)}") from exc
    if parsed != length:
        raise CheckpointError(str(source), "the file shrank while it was read.")


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
            raise CheckpointError(str(path), f"cannot be read: {os_error_problem(exc, path)}") from exc

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
        name = sidecar.get("articles_file", self.path.with_suffix(".jsonl").name)
        # The name comes from the remote machine: only a file beside the array.
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise CheckpointError(
                str(self.sidecar_path), f"'articles_file' {name!r} is not a plain file name."
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


def open_checkpoint(path: Path, cluster: str | None = None) -> Checkpoint:
    """Open one checkpoint of either format; ``cluster`` defaults to its directory name."""
    path = Path(path)
    if path.suffix == LEGACY_SUFFIX:
        return LegacyCheckpoint(path, cluster)
    if path.suffix == NPY_SUFFIX:
        return NpyCheckpoint(path, cluster)
    raise CheckpointError(str(path), f"unknown checkpoint type (expected {LEGACY_SUFFIX} or {NPY_SUFFIX}).")
