"""One cluster's files as the sync sees them: ``ClusterRemote``, a thin facade.

It connects (``ssh.py``), chooses how the files are reached (SFTP,
``sftp_files.py``; exec channels where the server has no SFTP, ``shell.py``),
and hands every call to that one ``FileAccess``, with asyncssh's errors
translated on the way out (``ssh.translate_errors``); the server's sha256
sums come batched (``hashes.py``). ``Remote`` is what the sync asks of a
remote, so that another (one serving files from memory) can stand in for it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractContextManager
from typing import Protocol

import anyio

from ..config import ClusterConfig
from ..errors import RemoteError, UnsafeRemoteNameError
from .files import (
    FileAccess,
    FileRead,
    Listing,
    RemoteFile,
    check_remote_name,
    checkpoint_entry,
    observe_outcome,
    remote_path,
)
from .hashes import Sha256Batcher
from .prompts import NoPrompter, Prompter
from .options import DEFAULT_SFTP_CHANNELS, DEFAULT_WINDOW, READ_AHEAD_BYTES
from .sftp_files import CHUNK_BYTES, MAX_BLOCK_SIZE, SftpFiles
from .shell import ShellFiles
from .ssh import (
    ChannelOpenError,
    Connection,
    SFTPError,
    translate_errors,
)
from .target import SSHTarget, resolve_target

# What the rest of the sync takes from here.
__all__ = [
    "CHUNK_BYTES", "DEFAULT_SFTP_CHANNELS", "DEFAULT_WINDOW", "MAX_BLOCK_SIZE", "READ_AHEAD_BYTES",
    "Address", "ClusterRemote", "ConnectOptions", "FileRead", "Listing", "Remote", "RemoteFile", "SSHTarget",
    "check_remote_name", "observe_outcome", "resolve_target",
]


class Address(Protocol):
    """Where a remote is, for messages."""

    @property
    def hostname(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def username(self) -> str: ...


class Remote(Protocol):
    """What the sync asks of one cluster's remote (``ClusterRemote`` over SSH)."""

    @property
    def cluster(self) -> ClusterConfig: ...

    @property
    def target(self) -> Address: ...

    @property
    def method(self) -> str:
        """How files are reached, for the report: "sftp", or "exec" where the server has no SFTP."""
        ...

    @property
    def is_closed(self) -> bool:
        """The connection dropped or was closed: the sync connects again."""
        ...

    def scan_checkpoints(self) -> AsyncIterator[RemoteFile | UnsafeRemoteNameError]: ...

    async def stat(self, name: str) -> RemoteFile: ...

    def read(self, name: str, offset: int, end: int) -> FileRead: ...

    async def sha256(self, name: str) -> str | None: ...

    def prefetch_sha256(self, name: str, size: int = 0) -> None:
        """Ask now for the hash a later ``sha256(name)`` will want (a hint: may do nothing)."""

    async def close(self) -> None: ...


class ConnectOptions(Protocol):
    """The sync's settings a connect takes (``transfer/sync.py``'s ``SyncOptions``)."""

    timeout: float
    window: int
    sftp_channels: int
    read_ahead: int
    prompter: Prompter | None


class ClusterRemote:
    """One authenticated SSH connection to one cluster (through its jump
    hosts, if any), and the files on it (``Remote``)."""

    def __init__(self, target: SSHTarget, connection: Connection, files: FileAccess):
        # Its remote_dir as the server resolved it: a ``~`` expanded where the files are reached.
        self.cluster = files.cluster
        self.target = target
        self._connection = connection
        self._files = files
        self._hashes = Sha256Batcher(connection.client)

    @property
    def method(self) -> str:
        return self._files.method

    @classmethod
    async def connect(cls, cluster: ClusterConfig, *, timeout: float = 30.0,
                      window: int = DEFAULT_WINDOW,
                      sftp_channels: int = DEFAULT_SFTP_CHANNELS,
                      prompter: Prompter | None = None,
                      read_ahead: int = READ_AHEAD_BYTES) -> ClusterRemote:
        """Connect and authenticate; host keys are always verified.

        ``timeout`` bounds the connect and login, and (through keepalives)
        how long a silently dead link goes unnoticed. ``prompter`` answers
        what the configuration does not: passwords, passphrases, 2FA codes.
        ``read_ahead``: the bytes in flight per file read (READ_AHEAD_BYTES).
        """
        # `ssh -G` (10-30 ms) in a worker thread: the other clusters' transfers go on meanwhile.
        target = await anyio.to_thread.run_sync(resolve_target, cluster)
        connection = await Connection.open(target, timeout=timeout, window=window,
                                           prompter=prompter or NoPrompter())
        try:
            with translate_errors(target):
                files = await _open_files(connection, cluster, sftp_channels, read_ahead, target.username)
        except BaseException:
            await connection.close()
            connection.close_jumps()
            raise
        return cls(target, connection, files)

    @classmethod
    async def connect_with(cls, cluster: ClusterConfig, options: ConnectOptions) -> ClusterRemote:
        """``connect`` with the sync's options: ``SyncOptions.connect``'s default."""
        return await cls.connect(cluster, timeout=options.timeout, window=options.window,
                                 sftp_channels=options.sftp_channels, prompter=options.prompter,
                                 read_ahead=options.read_ahead)

    async def close(self) -> None:
        self._hashes.close()
        await self._files.close_files()
        await self._connection.close(abort=self._files.has_unsettled_reads)
        await self._files.settle()
        self._connection.close_jumps()

    @property
    def is_closed(self) -> bool:
        return self._connection.is_closed

    async def __aenter__(self) -> ClusterRemote:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def list_checkpoints(self) -> Listing:
        """Regular files in remote_dir matching the cluster's patterns, by name."""
        files: list[RemoteFile] = []
        refused: list[UnsafeRemoteNameError] = []
        async for entry in self.scan_checkpoints():
            (refused if isinstance(entry, UnsafeRemoteNameError) else files).append(entry)
        files.sort(key=lambda f: f.name)
        return Listing(files, refused)

    async def scan_checkpoints(self) -> AsyncIterator[RemoteFile | UnsafeRemoteNameError]:
        """The checkpoints as the listing arrives, so downloads can start
        before the server has sent the last directory entry; a name that is
        not a plain file name comes as the error that refuses it."""
        remote_dir = self.cluster.remote_dir
        with translate_errors(self.target, remote_dir=remote_dir):
            async for name, size, mtime in self._files.scan():
                entry = checkpoint_entry(self.cluster, name, size, mtime)
                if entry is not None:
                    yield entry

    async def stat(self, name: str) -> RemoteFile:
        with translate_errors(self.target, name=name):
            return await self._files.stat(name)

    def read(self, name: str, offset: int, end: int) -> FileRead:
        """The bytes of ``[offset, end)`` in order, then the closing stat (``files.FileRead``).

        At most the read-ahead is in flight and held in memory per file; the
        read stops early, without the stat, if the remote file is shorter
        than ``end``: the caller compares what it got with what it expected.
        """
        return _Translated(self._files.read(name, offset, end),
                           lambda: translate_errors(self.target, name=name))

    async def sha256(self, name: str) -> str | None:
        """The server's ``sha256sum`` of the file, or None without a shell."""
        with translate_errors(self.target, name=name):
            return await self._hashes.sha256(remote_path(self.cluster, name))

    def prefetch_sha256(self, name: str, size: int = 0) -> None:
        """Queue the file's hash now, to be computed while the files travel;
        the first ``sha256(name)`` takes the answer, a later one asks again
        (after a change on the server, the retry wants the new content's)."""
        self._hashes.prefetch(remote_path(self.cluster, name), size)


async def _open_files(connection: Connection, cluster: ClusterConfig, channels: int,
                      read_ahead: int, username: str = "") -> FileAccess:
    """The SFTP pool; for a server without an SFTP subsystem, exec channels."""
    try:
        return await SftpFiles.open(connection.client, cluster, channels, read_ahead)
    except (ChannelOpenError, SFTPError) as exc:
        if connection.is_closed:
            raise  # a drop, not a server without SFTP
        shell = ShellFiles(connection.client, cluster, username=username)
        try:
            has_shell = await shell.probe()
        except ChannelOpenError:
            has_shell = False
        if not has_shell:
            raise RemoteError(cluster.name, "the server offers neither SFTP nor a shell "
                                            "to run commands, so files cannot be read "
                                            "from it.") from exc
        return shell


class _Translated(FileRead):
    """A read whose errors are translated, as every other call's."""

    def __init__(self, read: FileRead, translating: Callable[[], AbstractContextManager[None]]):
        super().__init__()
        self._inner = read
        self._translating = translating

    async def _open(self) -> None:
        with self._translating():
            await self._inner.__aenter__()

    async def _read(self) -> AsyncGenerator[bytes, None]:
        with self._translating():
            async for chunk in self._inner.chunks():
                yield chunk
        self.closing_stat = self._inner.closing_stat

    async def _close(self) -> None:
        with self._translating():
            await self._inner.__aexit__(None, None, None)
