"""Reaching clusters the way ssh does: ssh config aliases, jump hosts,
prompted passwords, passphrases and 2FA codes, and no SFTP subsystem."""

from __future__ import annotations

import getpass
import shutil
import sys
import uuid
from pathlib import Path

import anyio
import asyncssh
import pytest
from openssh import OpenSSHServer
from reliability_helpers import make_files, sync_in_process
from terminal import Terminal

from async_embed_sync.config import load_config
from async_embed_sync.testing.background import background_loop
from async_embed_sync.testing.embedded_server import EmbeddedSFTPServer
from async_embed_sync.testing.synthetic import finish_writing
from async_embed_sync.transfer.prompts import NoPrompter, Prompter
from async_embed_sync.transfer.remote import resolve_target

MiB = 1024 * 1024
CODE = "492817"
PASSWORD = "correct-horse-battery"


class ScriptedPrompter(Prompter):
    """Answers like a person would; records what it was asked."""

    def __init__(self, answers: dict[str, str]):
        self.answers = answers
        self.asked: list[tuple[str, bool]] = []

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        self.asked.append((prompt, secret))
        return next(answer for key, answer in self.answers.items() if key in prompt)


def _same(remote_dir, local_dir):
    names = sorted(p.name for p in remote_dir.iterdir())
    assert sorted(p.name for p in local_dir.iterdir()) == names
    for name in names:
        assert (local_dir / name).read_bytes() == (remote_dir / name).read_bytes(), name


# ------------------------------------------------------------- ssh config


def test_ssh_config_alias_is_resolved(openssh, tmp_path, write_config):
    remote = make_files(tmp_path / "remote", {"a.pkl": 300_000, "b.npy": 100_000})
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host tensor-login\n"
        "    HostName 127.0.0.1\n"
        f"    Port {openssh.port}\n"
        "    User root\n"
        f"    IdentityFile {openssh.client_key_path}\n"
        f"    UserKnownHostsFile {openssh.known_hosts_path}\n")
    config = write_config(tmp_path, {"tensor01": {"host": "tensor-login", "remote_dir": str(remote),
                                                  "ssh_config": str(ssh_config)}})
    target = resolve_target(load_config(config).clusters["tensor01"])
    assert (target.hostname, target.port, target.username) == ("127.0.0.1", openssh.port, "root")
    assert target.identity_files == (str(openssh.client_key_path),)
    report = anyio.run(sync_in_process, config, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    _same(remote, tmp_path / "dl" / "tensor01")


def test_cluster_fields_win_over_the_ssh_config(tmp_path, write_config):
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text("Host alias\n    HostName 10.0.0.9\n    Port 2200\n    User bob\n"
                          "    ProxyJump gate@login.example:2022\n")
    config = write_config(tmp_path, {"c": {"host": "alias", "remote_dir": "/d", "port": 2300,
                                           "username": "carol", "ssh_config": str(ssh_config)}})
    target = resolve_target(load_config(config).clusters["c"])
    assert (target.hostname, target.port, target.username) == ("10.0.0.9", 2300, "carol")
    assert target.proxy_jump == ("gate@login.example:2022",)
    hop = target.hop(target.proxy_jump[0])
    assert (hop.hostname, hop.port, hop.username, hop.proxy_jump) == ("login.example", 2022, "gate", ())


# ----------------------------------------------------------------- jump host


@pytest.fixture
def jump_and_target(openssh, tmp_path_factory):
    """A second real sshd that accepts the same client key, reached through the first."""
    workdir = tmp_path_factory.mktemp("target-sshd")
    authorized = openssh.workdir / "authorized_keys"
    with OpenSSHServer(workdir, extra_config={"AuthorizedKeysFile": str(authorized)}) as target:
        yield openssh, target


def test_jump_host(jump_and_target, tmp_path, write_config):
    jump, target = jump_and_target
    remote = make_files(tmp_path / "remote", {"a.pkl": 2 * MiB, "b.pkl": MiB})
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(jump.known_hosts_path.read_text() + target.known_hosts_path.read_text())
    entry = jump.cluster_entry(str(remote), port=target.port, known_hosts=str(known_hosts),
                               proxy_jump=f"root@127.0.0.1:{jump.port}")
    config = write_config(tmp_path, {"tensor01": entry})
    logins_before = _logins(jump), _logins(target)
    report = anyio.run(sync_in_process, config, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    _same(remote, tmp_path / "dl" / "tensor01")
    # One login on the jump host, one on the target through it: one
    # connection per cluster as far as the user can tell.
    assert (_logins(jump), _logins(target)) == (logins_before[0] + 1, logins_before[1] + 1)


def _logins(server: OpenSSHServer) -> int:
    return server.log_path.read_text().count("Accepted publickey for root")


# ------------------------------------------------------ prompts and 2FA


@pytest.mark.anyio
async def test_keyboard_interactive_code_through_the_prompt_hook(tmp_path, embedded_server,
                                                                 write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 200_000})
    prompter = ScriptedPrompter({"Verification code": CODE})
    async with embedded_server(tmp_path / "srv", one_time_code=CODE, accept_client_key=False) as server:
        entry = server.cluster_entry("/ckpt")
        del entry["key_file"]
        config = write_config(tmp_path, {"tensor01": entry})
        report = await sync_in_process(config, tmp_path / "dl", prompter=prompter)
    assert report.ok, report.clusters["tensor01"].errors
    # The server's challenge reached the hook with its heading; the code is
    # typed like a password (the server asked for no echo).
    assert [(p.splitlines()[-1], secret) for p, secret in prompter.asked] == [("Verification code: ", True)]
    assert "Two-factor authentication" in prompter.asked[0][0]
    _same(remote, tmp_path / "dl" / "tensor01")


@pytest.mark.anyio
async def test_without_a_terminal_the_error_says_what_is_missing(tmp_path, embedded_server,
                                                                 write_config):
    make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 1000})
    async with embedded_server(tmp_path / "srv", one_time_code=CODE, password=PASSWORD,
                               accept_client_key=False) as server:
        entry = server.cluster_entry("/ckpt")
        del entry["key_file"]
        config = write_config(tmp_path, {"tensor01": entry})
        report = await sync_in_process(config, tmp_path / "dl", prompter=NoPrompter(), retries=0)
    error = report.clusters["tensor01"].errors[0]
    assert "no terminal" in error and "tensor01" in error
    assert not (tmp_path / "dl" / "tensor01").exists()


@pytest.mark.anyio
async def test_password_and_passphrase_asked_through_the_prompt_hook(tmp_path, embedded_server,
                                                                     write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 200_000})
    async with embedded_server(tmp_path / "srv", password=PASSWORD) as server:
        by_password = server.cluster_entry("/ckpt")
        del by_password["key_file"]
        encrypted = tmp_path / "encrypted_key"
        asyncssh.read_private_key(str(server.client_key_path)).write_private_key(
            str(encrypted), passphrase="open sesame")
        encrypted.chmod(0o600)
        by_key = server.cluster_entry("/ckpt", key_file=str(encrypted))
        config = write_config(tmp_path, {"by-password": by_password, "by-key": by_key})
        prompter = ScriptedPrompter({"Password for": PASSWORD, "Passphrase for key": "open sesame"})
        report = await sync_in_process(config, tmp_path / "dl", prompter=prompter)
    assert report.ok, {c.name: c.errors for c in report.clusters.values()}
    assert any(p.startswith("[by-password] Password for tester@127.0.0.1") for p, _ in prompter.asked)
    assert any(p.startswith(f"[by-key] Passphrase for key {encrypted}") for p, _ in prompter.asked)
    assert all(secret for _, secret in prompter.asked)
    for cluster in ("by-password", "by-key"):
        _same(remote, tmp_path / "dl" / cluster)


def test_password_typed_at_a_real_terminal_is_not_echoed(tmp_path, write_config):
    """The CLI's TerminalPrompter on a pseudo-terminal, as a person would use it."""
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 100_000})
    with background_loop("pty-test-server") as loop:
        server = EmbeddedSFTPServer(tmp_path / "srv", tmp_path / "keys", password=PASSWORD,
                                    accept_client_key=False)
        loop.run(server.start())
        try:
            entry = server.cluster_entry("/ckpt")
            del entry["key_file"]
            config = write_config(tmp_path, {"tensor01": entry})
            with Terminal([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                           "--download-dir", str(tmp_path / "dl")]) as terminal:
                assert b"Password for tester@127.0.0.1: " in terminal.read_until(b"Password for"), terminal.text()
                terminal.type(PASSWORD)
                assert terminal.wait() == 0, terminal.text()
                screen = terminal.screen
        finally:
            loop.run(server.close())
    assert PASSWORD.encode() not in screen  # getpass turned the echo off
    _same(remote, tmp_path / "dl" / "tensor01")


# ------------------------------------------------------------- without SFTP


@pytest.fixture(scope="module")
def sshd_without_sftp(tmp_path_factory, openssh):
    with OpenSSHServer(tmp_path_factory.mktemp("nosftp"), sftp=False) as server:
        yield server


@pytest.mark.anyio
async def test_without_sftp_the_exec_fallback_syncs_and_resumes(sshd_without_sftp, tmp_path,
                                                                link_proxy, write_config):
    remote = make_files(tmp_path / "remote", {"a.pkl": 24 * MiB, "b.pkl": 3 * MiB, "c.npy": 1000})
    async with link_proxy(sshd_without_sftp, cut_after=[14 * MiB]) as proxy:
        config = write_config(tmp_path, {"tensor01": sshd_without_sftp.cluster_entry(
            str(remote), port=proxy.port)})
        report = await sync_in_process(config, tmp_path / "dl", max_parallel=1)
    cluster = report.clusters["tensor01"]
    assert report.ok, cluster.errors
    assert cluster.method == "exec" and cluster.reconnects == 1
    assert cluster.verified_by == {"sha256"}
    _same(remote, tmp_path / "dl" / "tensor01")
    # Resumed, not restarted: far less than the 14 MiB already received came again.
    assert proxy.bytes_to_client - (27 * MiB + 1000) < 4 * MiB


@pytest.mark.anyio
async def test_neither_sftp_nor_a_shell_is_a_clear_error(tmp_path, embedded_server, write_config):
    make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 1000})
    async with embedded_server(tmp_path / "srv", sftp=False, allow_exec=False) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl", retries=0)
    assert report.clusters["tensor01"].errors == [
        "Cluster 'tensor01': the server offers neither SFTP nor a shell to run commands, so files "
        "cannot be read from it."]


# ------------------------------------------------------------- ~ in remote_dir


@pytest.fixture
def in_home():
    """A folder of checkpoints in the login's home (the tests log in as this user: root), removed after."""
    folder = Path.home() / f".async_embed_sync_test_{uuid.uuid4().hex[:8]}"
    (folder / "ckpt").mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.anyio
@pytest.mark.parametrize("how", ["sftp", "exec"])
@pytest.mark.parametrize("written", ["~/{folder}/ckpt", "~{user}/{folder}/ckpt/"])
async def test_a_remote_dir_written_from_the_home_directory_is_expanded_as_ssh_does(
        in_home, how, written, openssh, sshd_without_sftp, tmp_path, write_config):
    remote = make_files(in_home / "ckpt", {"a.pkl": 300_000, "b.npy": 1000})
    finish_writing(remote)
    server = openssh if how == "sftp" else sshd_without_sftp
    remote_dir = written.format(folder=in_home.name, user=getpass.getuser())
    config = write_config(tmp_path, {"tensor01": server.cluster_entry(remote_dir)})
    report = await sync_in_process(config, tmp_path / "dl")
    cluster = report.clusters["tensor01"]
    assert report.ok and cluster.method == how and cluster.verified_by == {"sha256"}, cluster.errors
    _same(remote, tmp_path / "dl" / "tensor01")
