"""The real sshd launcher: reachable by asyncssh and by OpenSSH's own sftp, host key checked."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import asyncssh
import pytest
from openssh import OpenSSHServer, sshd_available

from async_embed_sync.testing.netproxy import LinkProxy

pytestmark = pytest.mark.anyio

TIMEOUT = 20


def connect(server: OpenSSHServer, port: int | None = None, known_hosts: Path | None = None
            ) -> asyncssh.SSHClientConnection:
    return asyncssh.connect(server.host, port or server.port, username=server.username,
                            client_keys=[str(server.client_key_path)],
                            known_hosts=str(known_hosts or server.known_hosts_path),
                            connect_timeout=TIMEOUT)


def ssh_options(server: OpenSSHServer, port: int) -> list[str]:
    return ["-o", f"Port={port}", "-i", str(server.client_key_path),
            "-o", f"UserKnownHostsFile={server.known_hosts_for(port)}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes"]


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    path = tmp_path / "remote" / "shard_0.npy"
    path.parent.mkdir()
    path.write_bytes(os.urandom(500_000))
    return path


async def test_asyncssh_reads_over_sftp_and_runs_sha256sum(openssh: OpenSSHServer, payload: Path) -> None:
    async with connect(openssh) as conn:
        async with conn.start_sftp_client() as sftp:
            assert sorted(await sftp.listdir(str(payload.parent))) == [".", "..", payload.name]
            async with sftp.open(str(payload), "rb") as f:
                assert await f.read() == payload.read_bytes()
        result = await conn.run(f"sha256sum -- {payload}", timeout=TIMEOUT)
    assert result.stdout == f"{hashlib.sha256(payload.read_bytes()).hexdigest()}  {payload}\n"


async def test_known_hosts_pins_the_host_key(openssh: OpenSSHServer, tmp_path: Path) -> None:
    wrong_key = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{openssh.port} {wrong_key}")
    with pytest.raises(asyncssh.HostKeyNotVerifiable):
        async with connect(openssh, known_hosts=wrong):
            pass


def test_openssh_sftp_batch_mode_downloads(openssh: OpenSSHServer, payload: Path, tmp_path: Path) -> None:
    target = tmp_path / "downloaded.npy"
    batch = tmp_path / "batch"
    batch.write_text(f"get {payload} {target}\n")
    subprocess.run(["sftp", *ssh_options(openssh, openssh.port), "-b", str(batch),
                    f"{openssh.username}@{openssh.host}"],
                   check=True, capture_output=True, timeout=TIMEOUT)
    assert target.read_bytes() == payload.read_bytes()


async def test_reachable_through_a_link_proxy_with_its_own_known_hosts(
        openssh: OpenSSHServer, link_proxy: Callable[..., LinkProxy], payload: Path) -> None:
    proxy: LinkProxy
    async with link_proxy(openssh, delay=0.002) as proxy:
        async with connect(openssh, port=proxy.port, known_hosts=openssh.known_hosts_for(proxy.port)) as conn:
            async with conn.start_sftp_client() as sftp:
                assert (await sftp.stat(str(payload))).size == payload.stat().st_size
    assert proxy.connections == 1 and proxy.bytes_to_client > 0


@pytest.mark.skipif(not sshd_available() and os.environ.get("CI") != "true",
                    reason="OpenSSH sshd is not installed")  # CI installs it: there it must run
async def test_without_the_sftp_subsystem_sftp_is_refused_but_exec_works(tmp_path: Path) -> None:
    with OpenSSHServer(tmp_path / "nosftp", sftp=False) as server:
        async with connect(server) as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                async with conn.start_sftp_client():
                    pass
            assert (await conn.run("echo ok", timeout=TIMEOUT)).stdout == "ok\n"
