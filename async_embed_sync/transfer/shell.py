"""Files over exec channels, for servers whose SFTP subsystem is switched off.

Three POSIX commands do what SFTP would: ``find`` lists (NUL-separated, so
any file name survives), ``stat`` gives size and mtime, and ``tail -c +N``
streams a file from a byte offset, which is all a resume needs. Each runs
on a channel of its own; at most ``channels`` at once, since OpenSSH allows
10 per connection by default (MaxSessions).

No asyncssh import: the module drives the connection it is given through
``run`` and ``create_process``, and the facade (``remote.py``) translates
asyncssh's errors around every call, as for SFTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from ..config import ClusterConfig
from ..errors import RemoteDirectoryError, RemoteError, RemoteFileDeniedError, RemoteFileGoneError, TransferError
from .files import FileRead, RemoteFile, home_relative, remote_path, with_home

READ_BLOCK = 256 * 1024
DEFAULT_CHANNELS = 6


class ShellFiles:
    """A cluster's ``remote_dir`` over exec channels (``FileAccess``)."""

    method = "exec"
    has_unsettled_reads = False  # a read's one channel is closed when the read ends

    def __init__(self, connection: Any, cluster: ClusterConfig, channels: int = DEFAULT_CHANNELS,
                 username: str = ""):
        self._connection = connection
        self._cluster = cluster
        self._username = username or cluster.username or "?"
        self._channels = asyncio.Semaphore(channels)

    async def _run(self, command: str) -> tuple[int, bytes, str]:
        async with self._channels:
            result = await self._connection.run(command, encoding=None, check=False)
        stderr = (result.stderr or b"").decode("utf-8", "replace").strip()
        return result.exit_status, result.stdout or b"", stderr

    @property
    def cluster(self) -> ClusterConfig:
        return self._cluster

    async def probe(self) -> bool:
        """Whether the server runs commands at all (a shell is there); then ``~`` in
        ``remote_dir`` is expanded by that shell, as ``ssh host ls ~/ckpt`` would."""
        status, out, _ = await self._run("echo ok")
        if not (status == 0 and out.strip() == b"ok"):
            return False
        parts = home_relative(self._cluster.remote_dir)
        if parts is not None:
            user, rest = parts
            status, out, err = await self._run(f"printf '%s' ~{user}")
            home = out.decode("utf-8", "surrogateescape")
            if status != 0 or not home.startswith("/"):
                raise RemoteDirectoryError(self._cluster.name, self._cluster.remote_dir,
                                           err or f"the shell does not know the home of ~{user}")
            self._cluster = with_home(self._cluster, home, rest)
        return True

    async def scan(self) -> AsyncIterator[tuple[str, int, int]]:
        """(name, size, mtime) of the regular files in ``remote_dir``
        (symlinks to regular files included, as SFTP's stat sees them)."""
        remote_dir = self._cluster.remote_dir
        command = (f"find -L {shlex.quote(remote_dir)} -mindepth 1 -maxdepth 1 -type f "
                   f"-printf '%s %T@ %f\\0'")
        status, out, err = await self._run(command)
        if status != 0:
            raise RemoteDirectoryError(self._cluster.name, remote_dir, err or f"find exited with {status}")
        for record in out.split(b"\0"):
            if not record:
                continue
            size, mtime, name = record.split(b" ", 2)
            yield name.decode("utf-8", "surrogateescape"), int(size), int(float(mtime))

    async def stat(self, name: str) -> RemoteFile:
        status, out, err = await self._run(f"stat -L -c '%s %Y' -- {shlex.quote(remote_path(self._cluster, name))}")
        if status != 0:
            raise self.file_error(name, err or f"stat exited with {status}")
        size, mtime = out.split()
        return RemoteFile(name, int(size), int(mtime))

    def read(self, name: str, offset: int, end: int) -> FileRead:
        return _TailRead(self, name, offset, end)

    def file_error(self, name: str, err: str) -> RemoteError:
        """A command's failure on one file, as SFTP's status would say it: the account may not
        read it ("Permission denied"), it is gone ("No such file or directory"), or a failed read."""
        if "Permission denied" in err:
            return RemoteFileDeniedError(self._cluster.name, name, self._username, remote_path(self._cluster, name))
        if "No such file or directory" in err:
            return RemoteFileGoneError(self._cluster.name, name)
        return TransferError(self._cluster.name, name, err)

    async def close_files(self) -> None:
        pass  # nothing is closed later: a read's channel ends with the read

    async def settle(self) -> None:
        pass

    @contextlib.asynccontextmanager
    async def _process(self, command: str) -> AsyncGenerator[Any, None]:
        """A command's process on a channel of the pool, closed on the way out."""
        async with self._channels:
            process = await self._connection.create_process(command, encoding=None)
            try:
                yield process
            finally:
                process.close()


class _TailRead(FileRead):
    """``tail -c +N`` from ``offset``, cut off once ``end`` is reached (no
    ``| head``: a pipeline's status would hide tail's); then the closing stat."""

    def __init__(self, files: ShellFiles, name: str, offset: int, end: int):
        super().__init__()
        self._files, self._name, self._offset, self._end = files, name, offset, end

    async def _read(self) -> AsyncGenerator[bytes, None]:
        files, name = self._files, self._name
        remaining = self._end - self._offset
        command = f"tail -c +{self._offset + 1} -- {shlex.quote(remote_path(files._cluster, name))}"
        async with files._process(command) as process:
            while remaining > 0:
                chunk = await process.stdout.read(min(READ_BLOCK, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
                yield chunk
            if remaining > 0:  # the stream ended early: a short file, or a failure?
                completed = await process.wait()
                if completed.exit_status != 0:
                    err = (completed.stderr or b"").decode("utf-8", "replace").strip()
                    raise files.file_error(name, err or f"tail exited with {completed.exit_status}")
        if remaining == 0:
            self.closing_stat = await files.stat(name)
