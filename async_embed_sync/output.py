"""The merged result: staged beside the output, published atomically, read back.

The merge fills a :class:`StagingArea` (a hidden directory beside the output)
with ``embeddings.npy`` and ``articles.jsonl``, then :func:`publish` turns it
into either form of ``/work/shared/checkpoint-format.md``:

- a path ending in ``.pkl``: the legacy dict, pickled from the staged files
  without holding the embeddings or the article list in memory, then renamed
  into place;
- any other path: the staging directory itself, with ``manifest.json`` added,
  renamed into place as the bundle.

Nothing appears at the output path until the rename; the staging area is
removed on any exception, Ctrl-C included. :func:`load` reads either form.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from .checkpoints import RestrictedUnpickler, RowBlock, restricted_load
from .errors import CheckpointError, OutputError

PICKLE_SUFFIX = ".pkl"
EMBEDDINGS_FILE = "embeddings.npy"
ARTICLES_FILE = "articles.jsonl"
MANIFEST_FILE = "manifest.json"
_STAGED_ARTICLE_BATCHES = "articles.pickles"
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

# Large buffers are written this much at a time, so that the pages of a map
# can be released behind the writer.
_WRITE_SLICE_BYTES = 32 << 20


def is_pickle_output(path: Path) -> bool:
    """True when ``path`` names the legacy pickle form, else it names a bundle directory."""
    return Path(path).suffix == PICKLE_SUFFIX


class StagingArea:
    """A hidden directory beside the output, removed on leaving unless it was published."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = self.output  # replaced on entry

    def __enter__(self) -> StagingArea:
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(prefix=f".{self.output.name}.", suffix=".merging", dir=self.output.parent)
            )
        except OSError as exc:
            raise OutputError(str(self.output), f"cannot create a staging directory ({exc}).") from exc
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # After a publish of a bundle the directory has moved away: nothing left.
        shutil.rmtree(self.path, ignore_errors=True)

    @property
    def embeddings_path(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    @property
    def articles_path(self) -> Path:
        # A pickle output is fed from pickled batches, which are several
        # times faster to write and read back than JSON lines.
        return self.path / (_STAGED_ARTICLE_BATCHES if is_pickle_output(self.output) else ARTICLES_FILE)


class EmbeddingsWriter:
    """A preallocated ``.npy`` file, filled by appending row blocks in order.

    Writes go through the file descriptor, not a map, so the pages written do
    not stay in the process's resident set; with ``hashed``, the sha256 of
    the file is computed on the way.
    """

    def __init__(self, path: Path, shape: tuple[int, int], dtype: np.dtype, *, hashed: bool):
        self.path = Path(path)
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        self._sha256 = hashlib.sha256() if hashed else None
        header = io.BytesIO()
        npy_format.write_array_header_1_0(
            header, {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        )
        self._hash(header.getvalue())
        self._stream: BinaryIO = open(self.path, "wb")
        self._stream.write(header.getvalue())
        # Preallocate: the file has its final size before the first row is written.
        self._stream.truncate(len(header.getvalue()) + shape[0] * shape[1] * self.dtype.itemsize)

    def append(self, rows: np.ndarray) -> None:
        if self.rows_written + len(rows) > self.shape[0]:
            raise OutputError(str(self.path), "more rows than were planned.")
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        self._stream.write(memoryview(data).cast("B"))
        self._hash(data)
        self.rows_written += len(rows)

    def _hash(self, data: Any) -> None:
        if self._sha256 is not None:
            self._sha256.update(data)

    def close(self) -> str | None:
        """Check that every planned row was written; return the file's sha256 if hashed."""
        self._stream.close()
        if self.rows_written != self.shape[0]:
            raise OutputError(str(self.path), f"{self.rows_written} rows written, {self.shape[0]} planned.")
        return None if self._sha256 is None else self._sha256.hexdigest()


def _fast_pickler(stream: Any) -> pickle.Pickler:
    pickler = pickle.Pickler(stream, protocol=5)
    # No memo: several times faster on many small dicts and strings, and
    # safe because nothing written here refers to itself.
    pickler.fast = True
    return pickler


class ArticlesWriter:
    """Stages article rows: JSON lines for a bundle, pickled batches for a pickle."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._as_json = self.path.name == ARTICLES_FILE
        self._stream = open(self.path, "wb")

    def append(self, block: RowBlock) -> None:
        """Stage the article rows of ``block``."""
        if self._as_json:
            self._stream.writelines(block.article_lines())
        else:
            _fast_pickler(self._stream).dump(block.article_rows())

    def close(self) -> None:
        self._stream.close()


def read_articles(path: Path) -> Iterator[dict]:
    """The rows of an ``articles.jsonl`` written by :class:`ArticlesWriter`."""
    with open(path, encoding="utf-8") as stream:
        for line in stream:
            yield json.loads(line)


def _read_staged_batches(path: Path) -> Iterator[dict]:
    with open(path, "rb") as stream:
        unpickler = RestrictedUnpickler(stream, path)
        while stream.peek(1):
            yield from unpickler.load()


# -------------------------------------------------------------- legacy pickle form


class _StreamedList:
    """Pickles as a plain ``list`` whose items are drawn from an iterator.

    ``(list, (), None, iterator)`` makes the pickler write APPENDS batches as
    it goes, so the list is never held whole; it loads back as a plain list.
    """

    def __init__(self, items: Iterable[Any]):
        self._items = items

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (), None, iter(self._items))


def _address(buffer: Any) -> int:
    return int(np.frombuffer(buffer, dtype=np.uint8).ctypes.data) if memoryview(buffer).nbytes else 0


class _PageReleasingWriter:
    """A file wrapper that writes big buffers from ``mapping`` in slices and
    drops the mapped pages already written, which would otherwise count in
    the resident set for the rest of the run."""

    def __init__(self, stream: BinaryIO, mapping: mmap.mmap):
        self._stream = stream
        self._mapping = mapping
        self._mapping_start = _address(mapping)
        self._mapping_end = self._mapping_start + len(mapping)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        start = _address(view)
        if not self._mapping_start <= start < self._mapping_end:
            return self._stream.write(view)
        for first in range(0, len(view), _WRITE_SLICE_BYTES):
            piece = view[first : first + _WRITE_SLICE_BYTES]
            self._stream.write(piece)
            self._release(start + first - self._mapping_start, len(piece))
        return len(view)

    def _release(self, offset: int, length: int) -> None:
        aligned = offset - offset % mmap.PAGESIZE
        # Read-only file pages: dropping them loses nothing, a later read refaults them.
        self._mapping.madvise(mmap.MADV_DONTNEED, aligned, offset + length - aligned)


def _write_legacy_pickle(staging: StagingArea, target: Path, metadata: Mapping[str, Any]) -> None:
    with open(staging.embeddings_path, "rb") as array_stream:
        npy_format.read_magic(array_stream)
        shape, _, dtype = npy_format.read_array_header_1_0(array_stream)
        data_offset = array_stream.tell()
        # A private (copy-on-write) map: the buffer is writable, so the pickle
        # holds a bytearray and loads back as a writable array, as the legacy
        # merge's did; nothing is ever written to it.
        mapping = mmap.mmap(array_stream.fileno(), 0, access=mmap.ACCESS_COPY)
    embeddings = np.frombuffer(mapping, dtype=dtype, count=shape[0] * shape[1], offset=data_offset)
    document = {
        "embeddings": embeddings.reshape(shape),
        "articles": _StreamedList(_read_staged_batches(staging.articles_path)),
        **{key: metadata[key] for key in LEGACY_KEYS[2:]},
    }
    with open(target, "wb") as stream:
        _fast_pickler(_PageReleasingWriter(stream, mapping)).dump(document)
    # The map is unmapped when the last view of it goes, on return.


def _replace_directory(source: Path, target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise OutputError(str(target), "exists and is not a directory; refusing to replace it.")
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
        os.replace(target, previous)
    os.replace(source, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def publish(staging: StagingArea, metadata: Mapping[str, Any], embeddings_sha256: str | None) -> None:
    """Turn the staged files into the output form its path asks for, atomically.

    ``metadata`` holds every key of the legacy dict but the embeddings and
    the articles.
    """
    output = staging.output
    try:
        if is_pickle_output(output):
            if output.is_dir():
                raise OutputError(str(output), "is a directory; a .pkl output must be a file.")
            staged_pickle = staging.path / output.name
            _write_legacy_pickle(staging, staged_pickle, metadata)
            os.replace(staged_pickle, output)
        else:
            manifest = {**metadata, "embeddings_sha256": embeddings_sha256}
            manifest.update(embeddings_file=EMBEDDINGS_FILE, articles_file=ARTICLES_FILE)
            (staging.path / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            _replace_directory(staging.path, output)
    except OSError as exc:
        raise OutputError(str(output), f"cannot be written ({exc}).") from exc


# ------------------------------------------------------------------------- load


def _load_bundle(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        embeddings = np.load(path / manifest.get("embeddings_file", EMBEDDINGS_FILE), mmap_mode="r", allow_pickle=False)
        articles = list(read_articles(path / manifest.get("articles_file", ARTICLES_FILE)))
    except (OSError, ValueError) as exc:
        raise OutputError(str(path), f"is not a readable merged bundle ({exc}).") from exc
    return {"embeddings": embeddings, "articles": articles, **{key: manifest.get(key) for key in LEGACY_KEYS[2:]}}


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a merged result, either form, as the legacy dict.

    A bundle's embeddings are memory-mapped (read-only); a pickle's are read
    into memory, through the same restricted unpickler as the checkpoints.
    """
    path = Path(path)
    if path.is_dir():
        document = _load_bundle(path)
    else:
        try:
            document = restricted_load(path)
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
