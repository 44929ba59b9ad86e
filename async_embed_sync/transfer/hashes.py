"""The server's own sha256 of files, batched: one ``sha256sum -- a b c ...`` per batch.

A session per file costs ~0.1 s of setup (0.3-0.5 s on a busy sshd with
PAM), which dominates with many small checkpoints; so requests queue, and at
most ``workers`` batches of up to ``batch`` paths (and ``HASH_COMMAND_CHARS``
of command line, and ``HASH_BATCH_BYTES`` of files where their sizes are
known) run at once. The sync asks for every file's hash as soon as
the listing names it (``prefetch``), so that the hashes are computed while
the files travel, in a few large batches, instead of a batch per handful of
files in flight. A server without a shell, or without
``sha256sum``, answers None from then on. Closing fails every request still
waiting as a closed connection. No asyncssh import: the names it needs come
from ``ssh.py``, and the facade (``remote.py``) translates the errors.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

from .files import observe_outcome
from .ssh import ChannelOpenError, closed_connection_error

MAX_CONCURRENT_HASHES = 2
HASH_BATCH = 256
# The shell gets the command as one argument: Linux caps one at 128 KiB.
HASH_COMMAND_CHARS = 64 * 1024
# A batch answers when its last file is hashed: bounded in bytes, the first
# answers come soon and the batches stay ahead of the files they vouch for.
HASH_BATCH_BYTES = 32 * 1024 * 1024


class Sha256Batcher:
    def __init__(self, connection: Any, workers: int = MAX_CONCURRENT_HASHES, batch: int = HASH_BATCH):
        self._connection = connection
        self._max_workers = workers
        self._batch = batch
        self._queue: list[tuple[str, int, asyncio.Future]] = []
        self._workers: set[asyncio.Future] = set()
        self._has_shell: bool | None = None
        # Answers asked for ahead (``prefetch``), each taken by the first ``sha256`` of its path.
        self._early: dict[str, asyncio.Future] = {}

    def prefetch(self, path: str, size: int = 0) -> None:
        """Queue ``path``'s hash now (``size``: its bytes, to bound the batch);
        the next ``sha256(path)`` takes its answer."""
        if self._has_shell is False or path in self._early:
            return
        answer = self._request(path, size)
        answer.add_done_callback(observe_outcome)  # a drop or close() fails it: not news if nobody asks
        self._early[path] = answer

    async def sha256(self, path: str) -> str | None:
        """The server's ``sha256sum`` of ``path``, or None without a shell."""
        answer = self._early.pop(path, None)
        if answer is None:
            if self._has_shell is False:
                return None
            answer = self._request(path, 0)
        return await answer

    def _request(self, path: str, size: int) -> asyncio.Future:
        answer = asyncio.get_running_loop().create_future()
        self._queue.append((path, size, answer))
        # A worker that just ended may not have left the set yet (its done
        # callback runs later): it serves no one, so it is not counted.
        if sum(not worker.done() for worker in self._workers) < self._max_workers:
            worker = asyncio.ensure_future(self._batches())
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)
        return answer

    def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        _fail_waiters([(path, answer) for path, _, answer in self._queue], closed_connection_error())
        self._queue = []
        self._early.clear()

    def _next_batch(self) -> list[tuple[str, asyncio.Future]]:
        count, chars, size = 0, 0, 0
        for path, bytes_, _ in self._queue[:self._batch]:
            chars += len(path) + 3
            size += bytes_
            if count and (chars > HASH_COMMAND_CHARS or size > HASH_BATCH_BYTES):
                break
            count += 1
        batch, self._queue = self._queue[:count], self._queue[count:]
        return [(path, answer) for path, _, answer in batch]

    async def _batches(self) -> None:
        while self._queue:
            batch = self._next_batch()
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
