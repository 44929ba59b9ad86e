"""A drop during the first SSH handshake: the host answered, so it is a dropped
connection, retried with the reconnect backoff, not an unreachable host."""

from __future__ import annotations

import asyncio

import pytest
from reliability_helpers import MiB, assert_mirrored, make_files, sync_in_process

from async_embed_sync.errors import ConnectError, HandshakeDroppedError, SyncFailedError

pytestmark = pytest.mark.anyio


async def test_a_drop_during_the_first_handshake_is_retried_as_a_drop(tmp_path, embedded_server, link_proxy,
                                                                      write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": MiB, "b.npy": 300_000})
    async with embedded_server(tmp_path / "srv") as server, link_proxy(server, cut_after=300) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        report = await asyncio.wait_for(sync_in_process(config, tmp_path / "dl"), 60)
    cluster = report.clusters["tensor01"]
    assert report.ok, cluster.errors
    assert proxy.cuts == 1 and proxy.connections == 2 and cluster.reconnects == 1
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")


async def test_a_handshake_that_always_drops_is_worded_as_a_drop(tmp_path, embedded_server, link_proxy,
                                                                 write_config):
    make_files(tmp_path / "srv" / "ckpt", {"a.pkl": MiB})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, cut_after=[300 + 400 * i for i in range(10)]) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        report = await asyncio.wait_for(sync_in_process(config, tmp_path / "dl", retries=2), 60)
    [failure] = report.clusters["tensor01"].failures
    assert isinstance(failure, HandshakeDroppedError) and isinstance(failure, ConnectError)
    assert proxy.connections == 3
    with pytest.raises(SyncFailedError) as raised:
        report.raise_for_failures()
    message = str(raised.value)
    assert f"tensor01: the connection to 127.0.0.1:{proxy.port} dropped during the SSH handshake " \
           f"(a rerun resumes)" in message, message
    assert "cannot be reached" not in message
