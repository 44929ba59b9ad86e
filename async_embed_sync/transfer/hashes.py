"""The server's own sha256 of files, batched: one ``sha256sum -- a b c ...`` per batch.

A session per file costs ~0.1 s of setup, which dominates with many small
checkpoints; so requests queue, and at most ``workers`` batches of up to
``batch`` paths run at once. A server without a shell, or without
``sha256sum``, answers None from then on. Closing fails every request still
waiting as a closed connection. No asyncssh import: the names it needs come
from ``ssh.py``, and the facade (``remote.py``) translates the errors.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from .ssh import ChannelOpenError, closed_connection_error

MAX_CONCURRENT_HASHES = 2
HASH_BATCH = 64


class Sha256Batcher:
    def __init__(self, connection: Any, workers: int = MAX_CONCURRENT_HASHES, batch: int = HASH_BATCH):
        self._connection = connection
        self._max_workers = workers
        self._batch = batch
        self._queue: list[tuple[str, asyncio.Future]] = []
        self._workers: set[asyncio.Future] = set()
        self._has_shell: bool | None = None

    async def sha256(self, path: str) -> str | None:
        """The server's ``sha256sum`` of ``path``, or None without a shell."""
        if self._has_shell is False:
            return None
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((path, answer))
        if len(self._workers) < self._max_workers:
            worker = asyncio.ensure_future(self._batches())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        return await answer

    def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        _fail_waiters(self._queue, closed_connection_error())
        self._queue = []

    async def _batches(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:self._batch], self._queue[self._batch:]
            try:
                digests = await self._sha256sum([path for path, _ in batch])
            except BaseException as exc:  # a drop, or close(): each waiting file learns of it
                _fail_waiters(batch, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for path, answer in batch:
                if not answer.done():
                    answer.set_result(digests.get(path))

    async def _sha256sum(self, paths: list[str]) -> dict[str, str]:
        command = "sha256sum -- " + " ".join(shlex.quote(p) for p in paths)
        try:
            result = await self._connection.run(command, check=False)
        except ChannelOpenError:
            if self._connection.is_closed():
                raise
            self._has_shell = False  # the server refuses sessions: no shell
            return {}
        if result.exit_status in (126, 127):  # no sha256sum (or no shell) there
            self._has_shell = False
            return {}
        self._has_shell = True
        digests = {}
        for line in (result.stdout if isinstance(result.stdout, str) else "").splitlines():
            digest, _, path = line.partition("  ")
            if len(digest) == 64:
                digests[path] = digest.lower()
        return digests


def _fail_waiters(waiters: list[tuple[str, asyncio.Future]], exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        exc = closed_connection_error()
    for _, answer in waiters:
        if not answer.done():
            answer.set_exception(exc)
