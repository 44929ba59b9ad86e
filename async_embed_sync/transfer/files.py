"""A cluster's files as the sync sees them, and the one shape every way of reaching them has.

``RemoteFile`` is a listed file; ``check_remote_name`` keeps a server-supplied
name from ever becoming a path, and ``checkpoint_entry`` is the one listing
filter (patterns, then that check) every remote applies. ``FileAccess`` is what SFTP (``sftp_files.py``)
and exec channels (``shell.py``) both offer the facade (``remote.py``), and
``FileRead`` is one read of a byte range: the chunks, then, separately, the
size and mtime the server reports after the last read.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import posixpath
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..config import ClusterConfig
from ..errors import UnsafeRemoteNameError

MAX_NAME_BYTES = 255


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: int


@dataclass(frozen=True)
class Listing:
    files: list[RemoteFile]
    refused: list[UnsafeRemoteNameError]


def check_remote_name(cluster: str, name: str) -> None:
    """Refuse a server-supplied name that is not a plain file name.

    Names become local paths: ``../x``, ``/etc/x``, ``a/b``, ``a\\b``, NUL,
    or an over-long name must never reach the file system.
    """
    why = None
    if name in ("", ".", ".."):
        why = "is not a file name"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif "\0" in name:
        why = "contains a NUL byte"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains control characters"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        why = f"is longer than {MAX_NAME_BYTES} bytes"
    if why:
        raise UnsafeRemoteNameError(cluster, name, why)


def checkpoint_entry(cluster: ClusterConfig, name: str, size: int,
                     mtime: int) -> RemoteFile | UnsafeRemoteNameError | None:
    """A listed entry as the sync takes it: None unless one of the cluster's
    patterns matches; the error that refuses a name that is not a plain file
    name; else the checkpoint."""
    if not any(fnmatch.fnmatchcase(name, p) for p in cluster.patterns):
        return None
    try:
        check_remote_name(cluster.name, name)
    except UnsafeRemoteNameError as exc:
        return exc
    return RemoteFile(name, size, mtime)


# A user name a shell's ``~user`` expands (POSIX portable user names).
_USER_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")


def home_relative(remote_dir: str) -> tuple[str, str] | None:
    """``remote_dir`` as written from a home directory: ("", rest) for ``~`` and ``~/rest``,
    (user, rest) for ``~user/rest``; None for any other path (absolute, or relative to the
    login directory, which SFTP and a shell both start in)."""
    if not remote_dir.startswith("~"):
        return None
    head, _, rest = remote_dir[1:].partition("/")
    if head and not _USER_NAME.fullmatch(head):
        return None  # "~x y": a name that is no user's, taken as it is written
    return head, rest.strip("/")


def with_home(cluster: ClusterConfig, home: str, rest: str) -> ClusterConfig:
    """``cluster`` with its ``~`` remote_dir expanded: ``home`` joined with ``rest``."""
    return dataclasses.replace(cluster, remote_dir=posixpath.join(home, rest) if rest else home)


def remote_path(cluster: ClusterConfig, name: str) -> str:
    """Where the file ``name`` of ``remote_dir`` is, on the server."""
    return posixpath.join(cluster.remote_dir, name)


class FileRead:
    """One read of ``[offset, end)`` of a remote file; no I/O until entered::

        async with read:                       # opens the file
            async for chunk in read.chunks():  # bytes only, in order: a growing contiguous prefix
                ...
        read.closing_stat  # the size and mtime reported after the last read;
                           # None when the file ended early (shorter than ``end``)

    Leaving the block ends the read, whether or not every chunk was taken: a
    chunk not taken is a read given up (its requests are not waited for).
    Subclasses supply ``_read`` and, where there is something to open or to
    settle, ``_open`` and ``_close``.
    """

    def __init__(self) -> None:
        self.closing_stat: RemoteFile | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        if self._chunks is None:
            self._chunks = self._read()
        return self._chunks

    async def __aenter__(self) -> FileRead:
        await self._open()
        return self

    async def __aexit__(self, *exc_info) -> None:
        try:
            if self._chunks is not None:
                await self._chunks.aclose()  # a chunk not taken: GeneratorExit in _read, as a caller that gave up
        finally:
            await self._close()

    async def _open(self) -> None:
        pass

    def _read(self) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    async def _close(self) -> None:
        pass


class FileAccess(Protocol):
    """One way of reaching a cluster's ``remote_dir``: SFTP, or exec channels.

    Errors come out as the SSH client raised them (or as ours); the facade
    translates them (``ssh.translate_errors``).
    """

    @property
    def method(self) -> str:
        """"sftp", or "exec" where the server has no SFTP."""
        ...

    @property
    def cluster(self) -> ClusterConfig:
        """The cluster, its ``remote_dir`` as this server resolved it (``~`` expanded)."""
        ...

    @property
    def has_unsettled_reads(self) -> bool:
        """Reads given up that are still running: then close aborts the connection rather than wait on it."""
        ...

    def scan(self) -> AsyncIterator[tuple[str, int, int]]:
        """(name, size, mtime) of the regular files, symlinks followed, as the listing arrives."""
        ...

    async def stat(self, name: str) -> RemoteFile:
        ...

    def read(self, name: str, offset: int, end: int) -> FileRead:
        ...

    async def close_files(self) -> None:
        """At close, before the connection closes: let the remote files closed
        without waiting be answered (bounded by a timeout)."""
        ...

    async def settle(self) -> None:
        """At close, once the connection is closed: observe how the reads given up ended."""
        ...


def observe_outcome(request: asyncio.Future) -> None:
    """Mark how a finished request ended as seen, so that asyncio does not report it as never retrieved."""
    if not request.cancelled():
        request.exception()  # observed: the caller already has the error that matters
