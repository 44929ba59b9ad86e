"""The emulated link: bytes intact, faults at exact byte counts, delay and rate roughly."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from async_embed_sync.testing.netproxy import LinkProxy, run_in_thread

pytestmark = pytest.mark.anyio

IO_TIMEOUT = 10.0


class PayloadServer:
    """Sends ``payload`` to each client, then keeps what the client sends until its EOF."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.received: list[bytes] = []
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.payload)
            await writer.drain()
            self.received.append(await reader.read())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> PayloadServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._server.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the client receives until EOF or a reset."""
    data = bytearray()
    while True:
        try:
            chunk = await asyncio.wait_for(reader.read(1 << 16), IO_TIMEOUT)
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def exchange(port: int, upload: bytes = b"") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(upload)
    writer.write_eof()
    received = await read_until_closed(reader)
    writer.close()
    return received


@pytest.fixture
async def payload_server() -> AsyncIterator[PayloadServer]:
    async with PayloadServer(os.urandom(3 * 1024 * 1024 + 17)) as server:
        yield server


async def test_forwards_both_directions_intact_and_counts(payload_server: PayloadServer) -> None:
    upload = os.urandom(1024 * 1024 + 5)
    async with LinkProxy("127.0.0.1", payload_server.port) as proxy:
        received = await exchange(proxy.port, upload)
        for _ in range(100):  # the server side finishes reading a moment later
            if payload_server.received:
                break
            await asyncio.sleep(0.01)
    assert received == payload_server.payload
    assert payload_server.received == [upload]
    assert (proxy.bytes_to_client, proxy.bytes_to_server) == (len(received), len(upload))
    assert proxy.connections == 1 and proxy.cuts == 0


async def test_cut_after_delivers_exactly_n_bytes_then_accepts_new_connections(
        payload_server: PayloadServer) -> None:
    async with LinkProxy("127.0.0.1", payload_server.port, cut_after=[100_003, 1_500_000]) as proxy:
        first = await exchange(proxy.port)
        second = await exchange(proxy.port)
        third = await exchange(proxy.port)
    assert first == payload_server.payload[:100_003]
    assert second == payload_server.payload[:1_500_000 - 100_003]
    assert third == payload_server.payload
    assert proxy.cuts == 2 and proxy.connections == 3


async def test_cut_now_and_set_cut_after_at_run_time(payload_server: PayloadServer) -> None:
    async with LinkProxy("127.0.0.1", payload_server.port, stall_after=10_000) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert len(await reader.readexactly(10_000)) == 10_000
        proxy.cut_now()
        assert await read_until_closed(reader) == b""
        writer.close()
        proxy.resume()
        proxy.set_cut_after(proxy.bytes_to_client + 777)
        assert await exchange(proxy.port) == payload_server.payload[:777]
        with pytest.raises(ValueError):
            proxy.set_cut_after([proxy.bytes_to_client + 10, proxy.bytes_to_client + 5])
        with pytest.raises(ValueError):
            proxy.set_cut_after(proxy.bytes_to_client)


async def test_stall_keeps_the_socket_open_and_resume_delivers_the_rest(
        payload_server: PayloadServer) -> None:
    async with LinkProxy("127.0.0.1", payload_server.port, stall_after=65_537) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        head = await asyncio.wait_for(reader.readexactly(65_537), IO_TIMEOUT)
        assert proxy.stalled
        # Nothing more may arrive while stalled; the socket stays open (no EOF).
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.3)
        assert proxy.bytes_to_client == 65_537
        proxy.resume()
        writer.write_eof()
        rest = await read_until_closed(reader)
        writer.close()
    assert head + rest == payload_server.payload


async def test_delay_adds_latency_each_way() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server, LinkProxy("127.0.0.1", server.sockets[0].getsockname()[1], delay=0.05) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        started = time.monotonic()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), IO_TIMEOUT) == b"ping"
        round_trip = time.monotonic() - started
        writer.close()
    assert 0.1 <= round_trip < 1.0


async def test_rate_is_shared_by_all_connections(payload_server: PayloadServer) -> None:
    rate = 8 * 1024 * 1024  # two downloads of 3 MiB: at least 0.75 s at this rate
    async with LinkProxy("127.0.0.1", payload_server.port, rate=rate) as proxy:
        started = time.monotonic()
        results = await asyncio.gather(exchange(proxy.port), exchange(proxy.port))
        elapsed = time.monotonic() - started
    assert results == [payload_server.payload] * 2
    assert 0.7 <= elapsed < 3.0


async def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        LinkProxy("127.0.0.1", 1, delay=-1)
    with pytest.raises(ValueError):
        LinkProxy("127.0.0.1", 1, rate=0)


def test_run_in_thread_serves_synchronous_callers() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, run_in_thread("127.0.0.1", listener.getsockname()[1]) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=IO_TIMEOUT) as client:
            server_side, _ = listener.accept()
            with server_side:
                server_side.sendall(b"hello")
                assert client.recv(5) == b"hello"
    assert proxy.bytes_to_client == 5


def test_command_line_prints_its_port_and_forwards() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    target = f"127.0.0.1:{listener.getsockname()[1]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "async_embed_sync.testing.netproxy", "--target", target, "--delay-ms", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        with listener, socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as client:
            server_side, _ = listener.accept()
            with server_side:
                client.sendall(b"ping")
                assert server_side.recv(4) == b"ping"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=IO_TIMEOUT)
    assert process.returncode == 0
    assert "bytes_to_server=4" in stderr
