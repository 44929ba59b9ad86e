"""Clusters served from memory, with scripted faults: the sync without SSH.

The other end of the seam that ``transfer/options.py``'s ``SyncOptions.connect``
fills, as httpx's ``MockTransport`` is of its transport: ``MemoryServer.connect``
makes one ``MemoryRemote`` (``transfer/remote.py``'s ``Remote``) per connection.
A fault raises the error, class and words, that ``transfer/ssh.py``'s
``translate_errors`` makes of the real one; a drop ends the connection under
every request on it, so the sync reconnects as it does over SSH. What was
served is recorded, for the tests to assert on.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import anyio
import anyio.lowlevel

from ..config import ClusterConfig
from ..errors import (
    ConnectError,
    ConnectionDroppedError,
    RemoteFileGoneError,
    UnsafeRemoteNameError,
)
from ..transfer.files import FileRead, RemoteFile, checkpoint_entry

# How asyncssh words each end of a connection (the error then says "connection lost (...)").
CUT = "the connection was closed from the other end"  # the socket's end of file
STALLED = "Server not responding to keepalive"  # the keepalives give up after about ``timeout``
CLOSED = "the connection was closed"  # by the client, under a request still waiting


@dataclass
class MemoryFile:
    """One file and its faults, each at an offset into the file, each once (a change: ``changes`` times)."""

    data: bytes
    mtime: int = 1_700_000_000
    drop_at: list[int] = field(default_factory=list)  # the link is cut when a read gets there
    stall_at: int | None = None  # a read getting there stalls the link: cut after ``timeout``
    change_at: int | None = None  # a read getting there finds the file rewritten as ``changed_to``,
    changed_to: bytes = b""        # with a new mtime: so do the next ``changes - 1`` reads getting there
    changes: int = 1
    wrong_hashes: int = 0  # sha256 answers a wrong digest this many times


@dataclass
class MemoryCluster:
    files: dict[str, MemoryFile]
    shell: bool = True  # without one, sha256 answers None: files are verified by size
    refused: set[int] = field(default_factory=set)  # connect attempts refused (0: the first)
    chunk_delay: float = 0.0  # seconds before each chunk arrives: a slow link, so reads overlap in time


@dataclass(frozen=True)
class ServedRead:
    cluster: str
    name: str
    offset: int
    end: int
    connection: int  # the cluster's connect attempt it ran on (0: the first)
    in_flight: dict[str, int]  # reads open per cluster as it opened, itself included


@dataclass(frozen=True)
class MemoryAddress:
    hostname: str
    port: int
    username: str


class _Options(Protocol):
    timeout: float  # the sync's: how long a stalled link goes unnoticed


class MemoryServer:
    """``{cluster: {name: bytes or MemoryFile}}`` (or a ``MemoryCluster``), served in chunks."""

    def __init__(self, clusters: dict[str, dict[str, bytes | MemoryFile] | MemoryCluster], *,
                 chunk_size: int = 64 * 1024):
        self.clusters = {name: files if isinstance(files, MemoryCluster) else MemoryCluster(
            {n: f if isinstance(f, MemoryFile) else MemoryFile(f) for n, f in files.items()})
            for name, files in clusters.items()}
        self.chunk_size = chunk_size
        self.connects: Counter[str] = Counter()  # attempts per cluster, refused ones included
        self.reads: list[ServedRead] = []
        self.served: Counter[tuple[str, str]] = Counter()  # bytes per (cluster, name)
        self.open_reads: Counter[str] = Counter()
        self.prefetched: list[tuple[str, str]] = []  # (cluster, name) whose hash was asked for ahead

    @classmethod
    def serving(cls, root: Path, **options: int) -> MemoryServer:
        """Each folder of ``root`` a cluster, and its files that cluster's."""
        return cls({folder.name: {path.name: path.read_bytes() for path in folder.iterdir()}
                    for folder in sorted(root.iterdir())}, **options)

    def file(self, cluster: str, name: str) -> MemoryFile:
        """The file as served, to script its faults on."""
        return self.clusters[cluster].files[name]

    def entries(self) -> dict[str, dict[str, object]]:
        """The clusters' ``credentials.json`` entries."""
        return {name: {"host": "memory", "port": 22, "username": "tester", "remote_dir": f"/{name}"}
                for name in self.clusters}

    def offsets(self, cluster: str, name: str) -> list[int]:
        """Where each read of the file began, in order."""
        return [read.offset for read in self.reads if (read.cluster, read.name) == (cluster, name)]

    @property
    def most_reads_in_flight(self) -> int:
        return max((sum(read.in_flight.values()) for read in self.reads), default=0)

    async def connect(self, cluster: ClusterConfig, options: _Options) -> MemoryRemote:
        """``SyncOptions.connect``: a new connection to ``cluster``, or the refusal scripted for it."""
        attempt = self.connects[cluster.name]
        self.connects[cluster.name] += 1
        await anyio.lowlevel.checkpoint()
        address = MemoryAddress(cluster.host, cluster.port or 22, cluster.username or "tester")
        if attempt in self.clusters[cluster.name].refused:
            raise ConnectError(cluster.name, address.hostname, address.port,
                               f"connection refused: nothing listens on {address.hostname}:{address.port}")
        return MemoryRemote(self, cluster, address, attempt, options.timeout)


class MemoryRemote:
    """One connection to one of a ``MemoryServer``'s clusters."""

    method = "sftp"

    def __init__(self, server: MemoryServer, cluster: ClusterConfig, target: MemoryAddress,
                 connection: int, timeout: float):
        self.cluster, self.target = cluster, target
        self._server, self._files = server, server.clusters[cluster.name]
        self._connection, self._timeout = connection, timeout
        self._lost: str | None = None  # how the connection ended
        self._stall: anyio.Event | None = None  # set once a stalled link is given up

    @property
    def is_closed(self) -> bool:
        return self._lost is not None

    async def close(self) -> None:
        self._lost = self._lost or CLOSED

    async def scan_checkpoints(self) -> AsyncIterator[RemoteFile | UnsafeRemoteNameError]:
        for name, file in sorted(self._files.files.items()):
            entry = checkpoint_entry(self.cluster, name, len(file.data), file.mtime)
            if entry is not None:
                yield entry

    async def stat(self, name: str) -> RemoteFile:
        file = await self._answer(name)
        return RemoteFile(name, len(file.data), file.mtime)

    def read(self, name: str, offset: int, end: int) -> FileRead:
        return _MemoryRead(self, name, offset, end)

    async def sha256(self, name: str) -> str | None:
        file = await self._answer(name)
        if not self._files.shell:
            return None
        if file.wrong_hashes:
            file.wrong_hashes -= 1
            return hashlib.sha256(b"not " + file.data).hexdigest()
        return hashlib.sha256(file.data).hexdigest()

    def prefetch_sha256(self, name: str, size: int = 0) -> None:
        self._server.prefetched.append((self.cluster.name, name))

    async def _answer(self, name: str) -> MemoryFile:
        """The file, once the link answers: not while it stalls, never once it is lost."""
        await anyio.lowlevel.checkpoint()
        if self._stall is not None:
            await self._stall.wait()
        if self._lost is not None:
            raise self._dropped(name)
        try:
            return self._files.files[name]
        except KeyError:
            raise RemoteFileGoneError(self.cluster.name, name) from None

    def _dropped(self, name: str, how: str = CUT) -> ConnectionDroppedError:
        self._lost = self._lost or how
        return ConnectionDroppedError(self.cluster.name, name, f"connection lost ({self._lost})")

    async def _at(self, name: str, file: MemoryFile, position: int) -> None:
        """The faults scripted at ``position``."""
        if position == file.change_at and file.changes:
            file.changes, file.data, file.mtime = file.changes - 1, file.changed_to, file.mtime + 1
        if position in file.drop_at:
            file.drop_at.remove(position)
            raise self._dropped(name)
        if position == file.stall_at:
            file.stall_at, self._stall = None, anyio.Event()
            await anyio.sleep(self._timeout)
            dropped = self._dropped(name, STALLED)
            self._stall.set()
            raise dropped


class _MemoryRead(FileRead):
    def __init__(self, remote: MemoryRemote, name: str, offset: int, end: int):
        super().__init__()
        self._remote, self._name, self._offset, self._end = remote, name, offset, end

    async def _open(self) -> None:
        remote, server, cluster = self._remote, self._remote._server, self._remote.cluster.name
        await remote._answer(self._name)
        server.open_reads[cluster] += 1
        server.reads.append(ServedRead(cluster, self._name, self._offset, self._end, remote._connection,
                                       dict(server.open_reads)))

    async def _read(self) -> AsyncGenerator[bytes, None]:
        remote, server, name = self._remote, self._remote._server, self._name
        position = self._offset
        while position < self._end:
            if remote._files.chunk_delay:
                await anyio.sleep(remote._files.chunk_delay)
            file = await remote._answer(name)
            await remote._at(name, file, position)
            faults = [o for o in (*file.drop_at, file.stall_at, file.change_at) if (o or 0) > position]
            chunk = file.data[position:min(self._end, position + server.chunk_size, *faults)]
            if not chunk:
                return  # the file ends early: no closing stat
            server.served[remote.cluster.name, name] += len(chunk)
            position += len(chunk)
            yield chunk
        self.closing_stat = await remote.stat(name)

    async def _close(self) -> None:
        self._remote._server.open_reads[self._remote.cluster.name] -= 1
