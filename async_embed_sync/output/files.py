"""An output file preallocated to its final size, and the region of it that the merged rows fill.

Rows are written with ``os.pwrite`` into a file preallocated to its final
size, never through a writable map: page-cache writeback stays asynchronous
and written pages never count in the process's resident set.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from numpy.lib import format as npy_format

from ..errors import OutputError
from ..fileio import COPY_BUFFER_BYTES, copy_range, pread_into, pwrite_all
from ..merging.digest import BackgroundDigest


class PreallocatedFile:
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
        pwrite_all(self.fd, data, offset)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class EmbeddingsRegion:
    """Where the merged rows go: ``shape`` rows, in order, from ``offset`` of ``file``.

    With a ``digest``, the rows are also hashed, in order, on its worker thread.
    """

    def __init__(
        self, file: PreallocatedFile, offset: int, shape: tuple[int, int], dtype: np.dtype,
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
            # Rows written in place before this output existed (the legacy pickle's
            # rows in its scratch file, see output/scratch.py) are not copied onto themselves.
            if not (offset == target and os.path.samestat(os.fstat(source_fd), os.fstat(self.file.fd))):
                copy_range(source_fd, self.file.fd, offset, rows * self.row_bytes, target)
            self.rows_written += rows
            return
        copy_rows_hashed(self, source_fd, offset, rows)

    def check_complete(self) -> None:
        if self.rows_written != self.shape[0]:
            raise OutputError(str(self.file.path), f"{self.rows_written} rows written, {self.shape[0]} planned.")


class EmbeddingRows(Protocol):
    """Where the merged rows go: one file's :class:`EmbeddingsRegion`, or a bundle's shards
    (``output/bundle.py``)."""

    shape: tuple[int, int]
    dtype: np.dtype

    def append(self, rows: np.ndarray) -> None: ...
    def wait(self) -> None: ...
    def copy_from(self, source_fd: int, offset: int, rows: int) -> None: ...
    def check_complete(self) -> None: ...


def copy_rows_hashed(sink: EmbeddingRows, source_fd: int, offset: int, rows: int) -> None:
    """Append to ``sink`` ``rows`` rows stored back to back, in its dtype, from ``offset`` of ``source_fd``.

    The digest needs the bytes: they pass through one reusable buffer.
    """
    if not rows:
        return
    row_bytes = sink.shape[1] * sink.dtype.itemsize
    buffer = np.empty((min(rows, max(1, COPY_BUFFER_BYTES // max(1, row_bytes))), sink.shape[1]), sink.dtype)
    for first in range(0, rows, len(buffer)):
        block = buffer[: min(len(buffer), rows - first)]
        pread_into(source_fd, block, offset + first * row_bytes)
        sink.append(block)
        sink.wait()


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The ``.npy`` header (format 1.0, read by numpy 1.x and 2.x) of a C-order array."""
    header = io.BytesIO()
    npy_format.write_array_header_1_0(
        header, {"descr": npy_format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    )
    return header.getvalue()


def append_copied(stream: BinaryIO, source_fd: int, spans: Iterable[tuple[int, int]]) -> None:
    """Append the ``(offset, length)`` spans of ``source_fd`` to ``stream``, copied in the kernel."""
    stream.flush()
    for offset, length in spans:
        copy_range(source_fd, stream.fileno(), offset, length)
    # The kernel moved the file position past the stream's idea of it.
    stream.seek(0, os.SEEK_END)
