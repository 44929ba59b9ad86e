"""A TCP proxy that behaves like a slow, breakable network link (no kernel ``netem`` here).

Per direction: one serialiser of ``rate`` shared by every connection (four
connections together get ``rate``, as on a real link; each chunk is
scheduled after the previous chunk's scheduled end, so timer lateness never
lowers the rate), then ``delay`` one way, with at most ``buffer_bytes``
queued per connection before TCP pushes back.

Faults fire at counts of bytes delivered to the client over the proxy's
life (``bytes_to_client``), never at times, so tests are deterministic:
``cut_after`` (one count or an increasing list: every open connection is
cut after exactly that many bytes; new ones are accepted) and
``stall_after`` (forwarding stops, sockets stay open, until ``resume()``).
At run time: ``cut_now()``, ``stall()``, ``resume()``, ``set_cut_after()``.

Run it as ``async with LinkProxy(host, port, delay=0.025) as proxy``, as
``with run_in_thread(host, port, ...)`` from synchronous code, or as
``python -m async_embed_sync.testing.netproxy --target HOST:PORT
--delay-ms 25 --rate-mbit 400`` (prints its port, runs until terminated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Self

from .background import background_loop

CHUNK_SIZE = 256 * 1024
DEFAULT_BUFFER_BYTES = 4 * 1024 * 1024
CONNECT_TIMEOUT = 10.0
CLOSE_TIMEOUT = 5.0


class _Serialiser:
    """One direction of the link: hands out delivery times, shared by all connections."""

    def __init__(self, delay: float, rate: float | None):
        self.delay = delay
        self.rate = rate
        self._link_free_at = 0.0

    def delivery_time(self, arrived_at: float, size: int) -> float:
        if self.rate is None:
            return arrived_at + self.delay
        starts_at = max(arrived_at, self._link_free_at)
        self._link_free_at = starts_at + size / self.rate
        return self._link_free_at + self.delay


class _Pipe:
    """Copies one direction of one connection through the delay line."""

    def __init__(self, proxy: LinkProxy, connection: _Connection, to_client: bool):
        self._proxy = proxy
        self._connection = connection
        self._to_client = to_client
        if to_client:
            self._reader, self._writer = connection.server_reader, connection.client_writer
            self._serialiser = proxy._downstream
        else:
            self._reader, self._writer = connection.client_reader, connection.server_writer
            self._serialiser = proxy._upstream
        self._queue: deque[tuple[float, bytes]] = deque()
        self._queued_bytes = 0
        self._queue_changed = asyncio.Event()
        self._reached_eof = False

    async def run(self) -> None:
        # Reading and delivering are separate tasks so that chunks in flight
        # overlap: the delay line holds up to buffer_bytes at once.
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read_into_queue())
            group.create_task(self._deliver_from_queue())

    async def _read_into_queue(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._connection.is_cut:
            if self._queued_bytes >= self._proxy.buffer_bytes:
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            chunk = await self._reader.read(CHUNK_SIZE)
            if not chunk:
                break
            self._queue.append((self._serialiser.delivery_time(loop.time(), len(chunk)), chunk))
            self._queued_bytes += len(chunk)
            self._queue_changed.set()
        self._reached_eof = True
        self._queue_changed.set()

    async def _deliver_from_queue(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._connection.is_cut:
            if not self._queue:
                if self._reached_eof:
                    if self._writer.can_write_eof():
                        self._writer.write_eof()
                    return
                self._queue_changed.clear()
                await self._queue_changed.wait()
                continue
            deliver_at, chunk = self._queue[0]
            wait = deliver_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._proxy._flowing.wait()
            if self._connection.is_cut:
                return
            sent = self._proxy._forward(self._writer, chunk, self._to_client)
            if sent < len(chunk):
                # A fault fired inside this chunk: the rest waits for resume().
                self._queue[0] = (deliver_at, chunk[sent:])
            else:
                self._queue.popleft()
            self._queued_bytes -= sent
            self._queue_changed.set()
            await self._writer.drain()


class _Connection:
    """One client connection and its upstream connection to the target."""

    def __init__(self, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter]):
        self.client_reader, self.client_writer = client
        self.server_reader, self.server_writer = server
        self.is_cut = False

    def cut(self) -> None:
        # The client side is closed, not aborted: the bytes already handed to
        # it must still arrive, so that "cut after N bytes" means exactly N.
        self.is_cut = True
        self.server_writer.transport.abort()
        self.client_writer.close()

    def close(self) -> None:
        # close() flushes what is still buffered; abort() would drop it.
        self.server_writer.close()
        self.client_writer.close()

    def abort(self) -> None:
        self.is_cut = True
        self.server_writer.transport.abort()
        self.client_writer.transport.abort()


class LinkProxy:
    """A TCP proxy from ``host:port`` (``port`` 0 picks a free one) to a target.

    ``delay`` is one way, in seconds; ``rate`` is bytes per second per
    direction shared by all connections (``None``: unlimited). See the module
    docstring for ``cut_after`` and ``stall_after``, which count
    ``bytes_to_client`` over the proxy's life.
    """

    def __init__(self, target_host: str, target_port: int, *,
                 delay: float = 0.0, rate: float | None = None,
                 cut_after: int | Sequence[int] | None = None,
                 stall_after: int | None = None,
                 host: str = "127.0.0.1", port: int = 0,
                 buffer_bytes: int = DEFAULT_BUFFER_BYTES):
        if delay < 0:
            raise ValueError("delay must be >= 0 seconds")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 bytes per second, or None for unlimited")
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = port
        self.buffer_bytes = buffer_bytes
        self.bytes_to_client = 0
        self.bytes_to_server = 0
        self.connections = 0
        self.cuts = 0
        self._downstream = _Serialiser(delay, rate)
        self._upstream = _Serialiser(delay, rate)
        self._cut_points: deque[int] = deque()
        self.set_cut_after(cut_after)
        self._stall_point = stall_after
        self._open: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._handle_client, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._open):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=CLOSE_TIMEOUT)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), CLOSE_TIMEOUT)
            self._server = None

    # ------------------------------------------------------- runtime faults

    def set_cut_after(self, counts: int | Sequence[int] | None) -> None:
        """Replace the cut schedule: lifetime ``bytes_to_client`` counts at which to cut."""
        points = [] if counts is None else [counts] if isinstance(counts, int) else list(counts)
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ValueError(f"cut points must increase: {points}")
        if points and points[0] <= self.bytes_to_client:
            raise ValueError(f"cut point {points[0]} is not after the {self.bytes_to_client} bytes already delivered")
        self._cut_points = deque(points)

    def cut_now(self) -> None:
        """Cut every open connection; later connections are accepted."""
        self.cuts += 1
        for connection in list(self._open):
            connection.cut()
        self._open.clear()

    def stall(self) -> None:
        """Stop forwarding in both directions, keeping every socket open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def open_connections(self) -> int:
        """Connections still being forwarded (a client gone is noticed at its next read or write)."""
        return len(self._open)

    @property
    def stalled(self) -> bool:
        return not self._flowing.is_set()

    # ---------------------------------------------------------- forwarding

    def _forward(self, writer: asyncio.StreamWriter, chunk: bytes, to_client: bool) -> int:
        """Write what of ``chunk`` may pass before the next fault; return its length."""
        if not to_client:
            writer.write(chunk)
            self.bytes_to_server += len(chunk)
            return len(chunk)
        triggers = [p for p in (self._next_cut_point(), self._stall_point) if p is not None]
        allowed = min([len(chunk)] + [p - self.bytes_to_client for p in triggers])
        writer.write(chunk[:allowed])
        self.bytes_to_client += allowed
        self._fire_due_faults()
        return allowed

    def _fire_due_faults(self) -> None:
        if self._stall_point is not None and self.bytes_to_client >= self._stall_point:
            self._stall_point = None
            self.stall()
        if self._cut_points and self.bytes_to_client >= self._cut_points[0]:
            self._cut_points.popleft()
            self.cut_now()

    def _next_cut_point(self) -> int | None:
        return self._cut_points[0] if self._cut_points else None

    async def _handle_client(self, client_reader: asyncio.StreamReader,
                             client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server = await asyncio.wait_for(
                asyncio.open_connection(self.target_host, self.target_port), CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            self._tasks.discard(task)
            client_writer.transport.abort()
            return
        connection = _Connection((client_reader, client_writer), server)
        self._open.add(connection)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(_Pipe(self, connection, to_client=False).run())
                group.create_task(_Pipe(self, connection, to_client=True).run())
        except* (ConnectionError, OSError):
            # Either end went away: tear down the other, unless a cut already
            # did (aborting the client now would drop the bytes it is owed).
            if not connection.is_cut:
                connection.abort()
        except* asyncio.CancelledError:
            # close() ends this handler. Ended quietly: Python 3.11's stream
            # server logs a cancelled handler as an "Exception in callback".
            pass
        finally:
            self._tasks.discard(task)
            self._open.discard(connection)
            connection.close()


@contextlib.contextmanager
def run_in_thread(target_host: str, target_port: int, **options: object) -> Iterator[LinkProxy]:
    """Run a ``LinkProxy`` on an event loop in a daemon thread, for synchronous callers.

    The counters may be read from the caller's thread; the fault controls
    must run on the proxy's loop: ``proxy.loop.call_soon_threadsafe(proxy.stall)``.
    """
    with background_loop("LinkProxy") as loop:
        proxy = LinkProxy(target_host, target_port, **options)  # type: ignore[arg-type]
        loop.run(proxy.start(), timeout=CONNECT_TIMEOUT)
        try:
            yield proxy
        finally:
            with contextlib.suppress(Exception):
                loop.run(proxy.close(), timeout=2 * CLOSE_TIMEOUT)


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m async_embed_sync.testing.netproxy",
        description="Forward TCP through an emulated link. Prints the listening port "
                    "on the first line of stdout, then runs until terminated.")
    parser.add_argument("--target", type=_parse_target, required=True, metavar="HOST:PORT")
    parser.add_argument("--listen-host", default="127.0.0.1")
    parser.add_argument("--listen-port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in milliseconds")
    parser.add_argument("--rate-mbit", type=float, default=None,
                        help="link rate per direction in Mbit/s (default: unlimited)")
    parser.add_argument("--cut-after", type=int, action="append", default=None, metavar="BYTES",
                        help="cut all connections when this many bytes have reached clients "
                             "over the proxy's life; repeat for repeated drops")
    parser.add_argument("--stall-after", type=int, default=None, metavar="BYTES")
    return parser.parse_args(argv)


async def _serve_until_terminated(args: argparse.Namespace) -> LinkProxy:
    rate = None if args.rate_mbit is None else args.rate_mbit * 1e6 / 8
    async with LinkProxy(*args.target, delay=args.delay_ms / 1000, rate=rate,
                         cut_after=args.cut_after, stall_after=args.stall_after,
                         host=args.listen_host, port=args.listen_port) as proxy:
        print(proxy.port, flush=True)
        terminated = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, terminated.set)
        await terminated.wait()
    return proxy


def main(argv: Sequence[str] | None = None) -> int:
    proxy = asyncio.run(_serve_until_terminated(_parse_args(argv)))
    print(f"connections={proxy.connections} bytes_to_client={proxy.bytes_to_client} "
          f"bytes_to_server={proxy.bytes_to_server} cuts={proxy.cuts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
