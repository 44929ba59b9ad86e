"""Files over exec channels, for servers whose SFTP subsystem is switched off.

Three POSIX commands do what SFTP would: ``find`` lists (NUL-separated, so
any file name survives), ``stat`` gives size and mtime, and ``tail -c +N``
streams a file from a byte offset, which is all a resume needs. Each runs
on a channel of its own; at most ``channels`` at once, since OpenSSH allows
10 per connection by default (MaxSessions).

This module never imports asyncssh: it drives the connection it is given
through ``create_process``, and ``remote.ClusterRemote`` maps asyncssh's
errors around every call, as for SFTP.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import AsyncIterator
from typing import Any

from ..errors import RemoteDirectoryError, TransferError

READ_BLOCK = 256 * 1024
DEFAULT_CHANNELS = 6


class ShellAccess:
    def __init__(self, connection: Any, cluster: str, channels: int = DEFAULT_CHANNELS):
        self._connection = connection
        self._cluster = cluster
        self._channels = asyncio.Semaphore(channels)

    async def _run(self, command: str) -> tuple[int, bytes, str]:
        async with self._channels:
            result = await self._connection.run(command, encoding=None, check=False)
        stderr = (result.stderr or b"").decode("utf-8", "replace").strip()
        return result.exit_status, result.stdout or b"", stderr

    async def probe(self) -> bool:
        """Whether the server runs commands at all (a shell is there)."""
        status, out, _ = await self._run("echo ok")
        return status == 0 and out.strip() == b"ok"

    async def scan(self, remote_dir: str) -> AsyncIterator[tuple[str, int, int]]:
        """(name, size, mtime) of the regular files in ``remote_dir``
        (symlinks to regular files included, as SFTP's stat sees them)."""
        command = (f"find -L {shlex.quote(remote_dir)} -mindepth 1 -maxdepth 1 -type f "
                   f"-printf '%s %T@ %f\\0'")
        status, out, err = await self._run(command)
        if status != 0:
            raise RemoteDirectoryError(self._cluster, remote_dir, err or f"find exited with {status}")
        for record in out.split(b"\0"):
            if not record:
                continue
            size, mtime, name = record.split(b" ", 2)
            yield name.decode("utf-8", "surrogateescape"), int(size), int(float(mtime))

    async def stat(self, path: str, name: str) -> tuple[int, int]:
        status, out, err = await self._run(f"stat -L -c '%s %Y' -- {shlex.quote(path)}")
        if status != 0:
            raise TransferError(self._cluster, name, err or f"stat exited with {status}")
        size, mtime = out.split()
        return int(size), int(mtime)

    async def read(self, path: str, name: str, offset: int, end: int) -> AsyncIterator[bytes]:
        """The bytes of ``[offset, end)`` in order; fewer if the file is shorter.

        ``tail`` streams to the end of the file and is cut off once ``end``
        is reached (no ``| head``: a pipeline's status would hide tail's)."""
        remaining = end - offset
        async with self._channels:
            process = await self._connection.create_process(
                f"tail -c +{offset + 1} -- {shlex.quote(path)}", encoding=None)
            try:
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
                        raise TransferError(self._cluster, name,
                                            err or f"tail exited with {completed.exit_status}")
            finally:
                process.close()
