"""The in-process SFTP server: host key checked, one client key, chrooted SFTP, sha256sum."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Callable
from pathlib import Path

import anyio
import asyncssh
import pytest

from async_embed_sync.config import load_config
from async_embed_sync.testing.embedded_server import EmbeddedSFTPServer

pytestmark = pytest.mark.anyio

CONNECT_TIMEOUT = 10


@pytest.fixture
def served_root(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    (root / "run1").mkdir(parents=True)
    (root / "run1" / "embeddings_0.pkl").write_bytes(os.urandom(300_000))
    (root / "run1" / "odd name\\x.json").write_bytes(b"{}")
    (tmp_path / "outside.txt").write_text("not served")
    return root


def connect(server: EmbeddedSFTPServer, **options: object) -> asyncssh.SSHClientConnection:
    settings: dict[str, object] = {
        "username": "anyone",
        "client_keys": [str(server.client_key_path)],
        "known_hosts": str(server.known_hosts_path),
        "connect_timeout": CONNECT_TIMEOUT,
    }
    settings.update(options)
    return asyncssh.connect(server.host, server.port, **settings)


async def test_serves_sftp_chrooted_to_root_after_verifying_the_host_key(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root) as server, connect(server) as conn:
        async with conn.start_sftp_client() as sftp:
            assert sorted(await sftp.listdir("/run1")) == [".", "..", "embeddings_0.pkl", "odd name\\x.json"]
            async with sftp.open("/run1/embeddings_0.pkl", "rb") as f:
                assert await f.read() == (served_root / "run1" / "embeddings_0.pkl").read_bytes()
            # The chroot holds: ".." from the root is the root itself.
            assert "outside.txt" not in await sftp.listdir("/..")
    assert server.connections == 1


async def test_known_hosts_names_the_port_and_the_key_file_is_private(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root) as server:
        host_pattern, key_type, key = server.known_hosts_path.read_text().split()[:3]
        assert host_pattern == f"[127.0.0.1]:{server.port}"
        assert f"{key_type} {key}" == server.host_key.export_public_key().decode().strip()
        assert stat.S_IMODE(server.client_key_path.stat().st_mode) == 0o600


async def test_refuses_a_host_key_it_does_not_hold(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root) as server, embedded_server(served_root) as other:
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            async with connect(server, known_hosts=str(other.known_hosts_for(server.port))):
                pass


async def test_refuses_an_unknown_client_key(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root) as server:
        stranger = asyncssh.generate_private_key("ssh-ed25519")
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(server, client_keys=[stranger]):
                pass


async def test_sha256sum_answers_like_coreutils_and_is_recorded(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    expected = hashlib.sha256((served_root / "run1" / "embeddings_0.pkl").read_bytes()).hexdigest()
    async with embedded_server(served_root) as server, connect(server) as conn:
        with_dashes = await conn.run("sha256sum -- /run1/embeddings_0.pkl", timeout=CONNECT_TIMEOUT)
        plain = await conn.run("sha256sum run1/embeddings_0.pkl", timeout=CONNECT_TIMEOUT)
        quoted = await conn.run("sha256sum -- '/run1/odd name\\x.json'", timeout=CONNECT_TIMEOUT)
        missing = await conn.run("sha256sum -- /run1/nope.pkl", timeout=CONNECT_TIMEOUT)
        escaping = await conn.run("sha256sum -- /../outside.txt", timeout=CONNECT_TIMEOUT)
        other = await conn.run("md5sum /run1/embeddings_0.pkl", timeout=CONNECT_TIMEOUT)
    assert (with_dashes.exit_status, with_dashes.stdout) == (0, f"{expected}  /run1/embeddings_0.pkl\n")
    assert (plain.exit_status, plain.stdout) == (0, f"{expected}  run1/embeddings_0.pkl\n")
    empty_json = hashlib.sha256(b"{}").hexdigest()
    assert quoted.stdout == f"\\{empty_json}  /run1/odd name\\\\x.json\n"
    assert missing.exit_status == 1 and "No such file" in missing.stderr and missing.stdout == ""
    assert escaping.exit_status == 1
    assert other.exit_status == 127
    assert server.exec_commands[0] == "sha256sum -- /run1/embeddings_0.pkl"
    assert len(server.exec_commands) == 6


async def test_without_exec_the_server_refuses_commands_but_serves_sftp(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root, allow_exec=False) as server, connect(server) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("sha256sum -- /run1/embeddings_0.pkl", timeout=CONNECT_TIMEOUT)
        async with conn.start_sftp_client() as sftp:
            assert await sftp.exists("/run1/embeddings_0.pkl")
    assert server.exec_commands == []


class FailingReads(asyncssh.SFTPServer):
    """Injects a fault: every read fails, everything else works."""

    def read(self, file_obj: object, offset: int, size: int) -> bytes:
        raise asyncssh.SFTPFailure("injected read failure")


async def test_a_custom_sftp_factory_injects_faults(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    async with embedded_server(served_root, sftp_factory=FailingReads) as server, connect(server) as conn:
        async with conn.start_sftp_client() as sftp:
            assert (await sftp.stat("/run1/embeddings_0.pkl")).size == 300_000
            async with sftp.open("/run1/embeddings_0.pkl", "rb") as f:
                with pytest.raises(asyncssh.SFTPFailure, match="injected"):
                    await f.read(10)


async def test_cluster_entry_is_a_valid_config_for_the_tool(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path,
        write_config: Callable[..., Path], tmp_path: Path) -> None:
    async with embedded_server(served_root) as server:
        path = write_config(tmp_path, {
            "direct": server.cluster_entry("/run1"),
            "proxied": server.cluster_entry("/run1", port=server.port + 1, pattern="*.pkl"),
        })
        config = load_config(path)
        direct, proxied = config.clusters["direct"], config.clusters["proxied"]
        assert (direct.port, direct.remote_dir, direct.username) == (server.port, "/run1", "tester")
        assert proxied.patterns == ("*.pkl",)
        assert Path(proxied.known_hosts).read_text().startswith(f"[127.0.0.1]:{server.port + 1} ssh-ed25519 ")
        assert Path(direct.known_hosts) == server.known_hosts_path


async def test_closing_the_server_ends_the_commands_it_is_still_answering(
        embedded_server: Callable[..., EmbeddedSFTPServer], served_root: Path) -> None:
    """A sha256sum still running when the server closes (the demo's Ctrl-C) is
    cancelled and awaited by ``close()``: left pending, asyncio reports it as
    "Task was destroyed but it is pending!" once its loop is gone."""
    fifo = served_root / "run1" / "still_being_written.pkl"
    os.mkfifo(fifo)  # hashing it blocks until someone writes: a hash that takes as long as the test wants
    try:
        async with embedded_server(served_root) as server, connect(server) as conn:
            await conn.create_process(f"sha256sum -- /run1/{fifo.name}")
            for _ in range(200):
                if server.exec_commands:
                    break
                await anyio.sleep(0.01)
            assert server.exec_commands == [f"sha256sum -- /run1/{fifo.name}"]
            await server.close()
            answering = [task for task in asyncio.all_tasks() if "_run_command" in repr(task.get_coro())]
            assert answering == [], answering
    finally:
        # Let the hashing thread finish, whether or not it has opened the pipe yet; never block here
        # (a plain open for writing waits for a reader, forever if the hash was cancelled before it began).
        writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # on Linux a FIFO opened so never waits
        os.unlink(fifo)  # a hash that starts later finds no file instead of waiting on the pipe
        os.close(writer)  # a hash waiting on the pipe reads its end
