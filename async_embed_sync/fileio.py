"""File operations the sync, the merge and the test servers share: hashing a file, a durable rename,
writes and reads at offsets, copies of byte ranges (in the kernel where it can)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks through one reusable buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Bytes copied through Python (not in the kernel) pass through a buffer of this size.
COPY_BUFFER_BYTES = 16 << 20


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (any contiguous buffer) at ``offset`` of ``fd``."""
    view = memoryview(data)
    if not view.nbytes:
        return  # e.g. no rows; an empty array's view cannot be cast
    view = view.cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def pread_into(fd: int, buffer: Any, offset: int) -> None:
    """Fill ``buffer`` from ``offset`` of ``fd``; a file that ends first is an ``OSError``."""
    view = memoryview(buffer).cast("B")
    while view:
        count = os.preadv(fd, [view], offset)
        if count == 0:
            raise OSError(f"the file ended {len(view)} bytes early")
        view, offset = view[count:], offset + count


def copy_range(source_fd: int, target_fd: int, offset: int, length: int, target_offset: int | None = None) -> None:
    """Copy ``length`` bytes from ``offset`` of the source to ``target_offset`` of the target
    (None: at the target's file position, which moves on)."""
    # In the kernel where it can: no pass of the bytes through Python.
    while length > 0:
        try:
            copied = os.copy_file_range(source_fd, target_fd, length, offset, target_offset)
        except OSError:
            data = os.pread(source_fd, min(length, COPY_BUFFER_BYTES), offset)
            copied = os.write(target_fd, data) if target_offset is None else os.pwrite(target_fd, data, target_offset)
        if copied == 0:
            raise OSError(f"the source ended {length} bytes early")
        offset, length = offset + copied, length - copied
        if target_offset is not None:
            target_offset += copied
