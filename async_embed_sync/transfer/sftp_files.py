"""Files over SFTP: a pool of channels, the directory scan, stat, and pipelined reads.

Each SFTP channel has its own receive window, and one window caps a channel
at window / RTT, so the files in flight are spread over a few channels. A
read keeps up to ``read_ahead`` bytes of block requests in flight and hands
out only the contiguous prefix that has arrived. Requests a read gives up
are never left unobserved: they are settled (waited for, briefly) or, after
a stop, watched until they end or the connection closes.

No asyncssh import: the module is given the connection and its SFTP
clients, takes the few asyncssh names it needs from ``ssh.py``, and the
facade (``remote.py``) translates the errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from typing import Any

import anyio

from ..config import ClusterConfig
from .files import FileRead, RemoteFile, home_relative, observe_outcome, remote_path, with_home
from .options import DEFAULT_SFTP_CHANNELS, READ_AHEAD_BYTES
from .ssh import CLOSE_TIMEOUT, FILE_TYPE_SYMLINK, REGULAR_FILE_TYPES

# OpenSSH's sftp-server advertises 261,120 bytes; asyncssh's own server 4 MiB.
# Larger blocks gain nothing past ~256 KiB and cost memory per request.
MAX_BLOCK_SIZE = 256 * 1024
# How long the reads still in flight when a file ends early or the link drops
# may take to come back: on a live link, about one RTT. Reads given up by a
# stop (Ctrl-C, SIGTERM) are not waited for: a slow link would keep
# delivering their bytes.
READ_SETTLE_TIMEOUT = 1.0
# Blocks that arrived together are handed out as one chunk up to this size:
# a few blocks per write, and a checkpoint still falls within this of its interval.
CHUNK_BYTES = 1024 * 1024


async def _expand_home(sftp: Any, cluster: ClusterConfig) -> ClusterConfig:
    """``~`` and ``~/rest`` from the login's home, where SFTP sessions start (its realpath of
    "."); ``~user/rest`` from that home's sibling ``user``, as clusters lay their homes out
    (SFTP has no way to ask for another user's home)."""
    parts = home_relative(cluster.remote_dir)
    if parts is None:
        return cluster
    user, rest = parts
    home = await sftp.realpath(".")
    if isinstance(home, bytes):
        home = home.decode("utf-8", "surrogateescape")
    return with_home(cluster, posixpath.join(posixpath.dirname(home), user) if user else home, rest)


class SftpFiles:
    """A cluster's ``remote_dir`` over a pool of SFTP channels (``FileAccess``)."""

    method = "sftp"

    def __init__(self, connection: Any, channels: list[Any], cluster: ClusterConfig,
                 read_ahead: int = READ_AHEAD_BYTES):
        self._connection = connection
        self._pool = channels
        self._users = [0] * len(channels)
        self._cluster = cluster
        self._read_ahead = read_ahead
        # Requests of reads given up (a drop, a stop): observed as they end, or at close.
        self._unsettled: set[asyncio.Future] = set()
        self._closing: set[asyncio.Future] = set()  # file closes sent, not answered yet

    @classmethod
    async def open(cls, connection: Any, cluster: ClusterConfig, channels: int = DEFAULT_SFTP_CHANNELS,
                   read_ahead: int = READ_AHEAD_BYTES) -> SftpFiles:
        """Open the pool at once, concurrently: opened one by one as files
        start, each would cost the first files ~3 round trips."""
        pool = await asyncio.gather(*(connection.start_sftp_client() for _ in range(channels)))
        return cls(connection, list(pool), await _expand_home(pool[0], cluster), read_ahead)

    @property
    def cluster(self) -> ClusterConfig:
        return self._cluster

    @property
    def answers_in_order(self) -> bool:
        """OpenSSH's sftp-server answers a channel's requests in order; asyncssh's own server need not."""
        version = self._connection.get_extra_info("server_version") or ""
        return version.startswith("SSH-2.0-OpenSSH")

    @property
    def has_unsettled_reads(self) -> bool:
        return bool(self._unsettled)

    async def scan(self) -> AsyncIterator[tuple[str, int, int]]:
        with self._lend() as sftp:
            async for entry in sftp.scandir(self._cluster.remote_dir):
                name = entry.filename
                if not isinstance(name, str):
                    name = name.decode("utf-8", "surrogateescape")
                if name in (".", ".."):
                    continue
                attrs = entry.attrs
                if attrs.type == FILE_TYPE_SYMLINK:
                    attrs = await sftp.stat(remote_path(self._cluster, name))
                if attrs.type in REGULAR_FILE_TYPES:
                    yield name, attrs.size or 0, int(attrs.mtime or 0)

    async def stat(self, name: str) -> RemoteFile:
        with self._lend() as sftp:
            attrs = await sftp.stat(remote_path(self._cluster, name))
        return _remote_file(name, attrs)

    def read(self, name: str, offset: int, end: int) -> FileRead:
        return _SftpRead(self, name, offset, end)

    def give_up(self, requests: Iterable[asyncio.Future]) -> None:
        """Let ``requests`` end without anyone waiting for them; each is
        observed when it ends (its error is not news), and until then it is
        unsettled: ``close()`` aborts the connection rather than wait on it."""
        for request in requests:
            if request.done():
                observe_outcome(request)
                continue
            self._unsettled.add(request)
            request.add_done_callback(self._ended)

    def keep_unsettled(self, requests: Iterable[asyncio.Future]) -> None:
        """Requests a settle timed out on: settled again at close."""
        self._unsettled.update(request for request in requests if not request.done())

    def _ended(self, request: asyncio.Future) -> None:
        self._unsettled.discard(request)
        observe_outcome(request)

    def close_later(self, file: Any) -> None:
        """Close a remote file without waiting for the answer: a read that
        waited would hold its file's slot for a round trip more, which for a
        small file is a third of its time. Its error is not news (the bytes
        are in, and checked)."""
        closing = asyncio.ensure_future(file.close())
        self._closing.add(closing)
        closing.add_done_callback(self._closed)

    def _closed(self, closing: asyncio.Future) -> None:
        self._closing.discard(closing)
        observe_outcome(closing)

    async def close_files(self) -> None:
        # Not waited for behind reads given up: their bytes (after a stop, a
        # drop) come first on the link, and the connection is aborted anyway.
        if not self._unsettled:
            await settle(self._closing, timeout=READ_SETTLE_TIMEOUT)
        self._unsettled.update(closing for closing in self._closing if not closing.done())
        self._closing.clear()

    async def settle(self) -> None:
        await settle(self._unsettled)
        self._unsettled.clear()

    @contextlib.contextmanager
    def _lend(self) -> Iterator[Any]:
        """Lend the least-used SFTP channel of the pool."""
        index = self._users.index(min(self._users))
        self._users[index] += 1
        try:
            yield self._pool[index]
        finally:
            self._users[index] -= 1


class _SftpRead(FileRead):
    """Pipelined block reads of ``[offset, end)``, handed out in order.

    The closing stat must describe the file after the reads: where the
    server answers in order it is sent right behind the last read and costs
    no round trip; elsewhere it is sent once the last read is answered.
    asyncssh's ``read_parallel`` is not used: abandoning its iterator (a drop,
    a cancel) leaves its reads running unobserved.
    """

    def __init__(self, files: SftpFiles, name: str, offset: int, end: int):
        super().__init__()
        self._files, self._name, self._end = files, name, end
        self._position = self._next = offset  # what was handed out; what was asked for
        self._in_flight: dict[int, asyncio.Future[bytes]] = {}
        self._stat_request: asyncio.Future | None = None
        self._given_up = False
        self._lent = contextlib.ExitStack()
        self._file: Any = None

    async def _open(self) -> None:
        try:
            sftp = self._lent.enter_context(self._files._lend())
            self._block = min(sftp.limits.max_read_len or MAX_BLOCK_SIZE, MAX_BLOCK_SIZE)
            self._max_requests = max(4, self._files._read_ahead // self._block)
            # block_size=0: each read is one request. Otherwise asyncssh runs
            # every read through its own parallel reader (a task per block, and
            # the block copied twice), and this read pipelines its own.
            self._file = await sftp.open(remote_path(self._files._cluster, self._name), "rb", block_size=0)
        except BaseException:
            self._lent.close()
            raise

    async def _read(self) -> AsyncGenerator[bytes, None]:
        try:
            while True:
                self._ask_ahead()
                if self._position >= self._end:
                    break
                # Shielded: a cancel must not cancel the read itself (see settle).
                data = await asyncio.shield(self._in_flight[self._position])
                chunk, ended_early = self._take_run(data)
                if chunk:
                    yield chunk
                if ended_early:
                    return  # the file shrank
            self.closing_stat = _remote_file(self._name, await asyncio.shield(self._stat_request))
        except (asyncio.CancelledError, GeneratorExit):
            # A stop, or the caller gave up on the file: nobody waits for these bytes any more.
            self._given_up = True
            raise

    def _take_run(self, data: bytes) -> tuple[bytes, bool]:
        """``data`` (the block at the position) and the blocks after it that
        have arrived too, as one chunk of at most ``CHUNK_BYTES``.

        Handed out one block at a time, every 255 KiB costs the caller a
        worker-thread hop to write it, and a GIL hand-over that waits on the
        busy event loop; blocks that came together are written together.
        A block that failed stays for the next await to raise, after what
        came before it is handed out (and kept). True: the file ended early."""
        blocks, size = [], 0
        while True:
            del self._in_flight[self._position]
            if not data:
                return b"".join(blocks), True
            blocks.append(data)
            size += len(data)
            self._position += len(data)
            self._ask_for_gap()
            following = self._in_flight.get(self._position)
            if (size >= CHUNK_BYTES or following is None or not following.done()
                    or following.cancelled() or following.exception() is not None):
                return (blocks[0] if len(blocks) == 1 else b"".join(blocks)), False
            data = following.result()

    def _ask_ahead(self) -> None:
        """Keep up to the read-ahead in flight; the closing stat behind the last read."""
        while self._next < self._end and len(self._in_flight) < self._max_requests:
            size = min(self._block, self._end - self._next)
            self._in_flight[self._next] = asyncio.ensure_future(self._file.read(size, self._next))
            self._next += size
        if self._stat_request is None and self._next >= self._end and (
                self._files.answers_in_order or self._position >= self._end):
            self._stat_request = asyncio.ensure_future(self._file.stat())

    def _ask_for_gap(self) -> None:
        """After a short read (the end of the file moved), ask for the bytes it left out."""
        if self._position < self._next and self._position not in self._in_flight:
            gap_end = min((o for o in self._in_flight if o > self._position), default=self._next)
            self._in_flight[self._position] = asyncio.ensure_future(
                self._file.read(gap_end - self._position, self._position))

    async def _close(self) -> None:
        try:
            requests = [*self._in_flight.values(), *filter(None, [self._stat_request])]
            if self._given_up:
                # Not waited for: on a slow link the read-ahead takes far
                # longer than a round trip to arrive, and the transfer would
                # go on that long after a Ctrl-C. They end on their own, or at close().
                self._files.give_up(requests)
            else:
                await settle(requests, timeout=READ_SETTLE_TIMEOUT)
                self._files.keep_unsettled(requests)
        finally:
            self._files.close_later(self._file)
            self._lent.close()


def _remote_file(name: str, attrs: Any) -> RemoteFile:
    return RemoteFile(name, attrs.size or 0, int(attrs.mtime or 0))


async def settle(requests: Iterable[asyncio.Future], timeout: float = CLOSE_TIMEOUT) -> None:
    """Let requests given up finish, and observe how they ended.

    Cancelling an asyncssh read does not cancel the tasks it started inside
    asyncssh, whose errors would then go unobserved; so the reads are
    awaited instead. After a drop they fail at once; on a stalled link they
    stay pending until ``close()`` aborts the connection and settles them.
    """
    requests = list(requests)
    if not requests:
        return
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(timeout):
            await asyncio.wait(requests)
    for request in requests:
        if request.done():
            observe_outcome(request)
