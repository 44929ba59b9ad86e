"""Host keys: unknown refused, changed refused loudly, accept-new opt-in."""

from __future__ import annotations

import logging
import os

import asyncssh
import pytest
from reliability_helpers import sync_in_process

from async_embed_sync.config import PROJECT_KNOWN_HOSTS

pytestmark = pytest.mark.anyio


def _serve(tmp_path):
    root = tmp_path / "srv"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "a.pkl").write_bytes(os.urandom(100_000))
    return root


async def test_unknown_host_is_refused_by_default(tmp_path, embedded_server, write_config):
    async with embedded_server(_serve(tmp_path)) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry(
            "/ckpt", known_hosts=str(tmp_path / "absent_known_hosts"))})
        report = await sync_in_process(config, tmp_path / "dl")
    error = report.clusters["tensor01"].errors[0]
    fingerprint = asyncssh.import_public_key(server.host_public_key).get_fingerprint()
    # The key offered, as ssh shows it, to compare with what the admins publish.
    assert f"The server offers the ssh-ed25519 key {fingerprint}; after checking it with the cluster's admins" \
        in error, error
    assert "ssh-keyscan" in error and error.endswith('"accept-new" for it).')
    assert not (tmp_path / "dl" / "tensor01").exists()
    assert not (tmp_path / PROJECT_KNOWN_HOSTS).exists()


async def test_accept_new_records_the_key_in_the_project_file(tmp_path, embedded_server,
                                                              write_config, caplog):
    async with embedded_server(_serve(tmp_path)) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry(
            "/ckpt", known_hosts=str(tmp_path / "absent_known_hosts"), host_key_policy="accept-new")})
        with caplog.at_level(logging.WARNING, logger="async_embed_sync"):
            first = await sync_in_process(config, tmp_path / "dl")
            said_first, _ = caplog.text, caplog.clear()
            recorded = (tmp_path / PROJECT_KNOWN_HOSTS).read_text()
            second = await sync_in_process(config, tmp_path / "dl")
            said_second = caplog.text
    assert first.ok and second.ok
    fingerprint = asyncssh.import_public_key(server.host_public_key).get_fingerprint()
    assert (f"cluster 'tensor01': permanently added '[127.0.0.1]:{server.port}' (ssh-ed25519, {fingerprint}) "
            f"to the list of known hosts in {tmp_path / PROJECT_KNOWN_HOSTS}") in said_first
    assert "permanently added" not in said_second  # said once, when it is recorded
    assert recorded == f"[127.0.0.1]:{server.port} {server.host_public_key.strip()}\n"
    assert (tmp_path / PROJECT_KNOWN_HOSTS).read_text() == recorded  # trusted, not added twice
    assert oct((tmp_path / PROJECT_KNOWN_HOSTS).stat().st_mode & 0o777) == "0o600"
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == \
        (tmp_path / "srv" / "ckpt" / "a.pkl").read_bytes()


async def test_accept_new_still_refuses_a_changed_key(tmp_path, embedded_server, write_config):
    async with embedded_server(_serve(tmp_path)) as server:
        impostor = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        (tmp_path / PROJECT_KNOWN_HOSTS).write_text(f"[127.0.0.1]:{server.port} {impostor}")
        config = write_config(tmp_path, {"tensor01": server.cluster_entry(
            "/ckpt", known_hosts=str(tmp_path / "absent_known_hosts"), host_key_policy="accept-new")})
        report = await sync_in_process(config, tmp_path / "dl")
    error = report.clusters["tensor01"].errors[0]
    fingerprint = asyncssh.import_public_key(server.host_public_key).get_fingerprint()
    assert "does not match" in error and f"The server now offers the ssh-ed25519 key {fingerprint}." in error
    assert (tmp_path / PROJECT_KNOWN_HOSTS).read_text() == f"[127.0.0.1]:{server.port} {impostor}"
    assert not (tmp_path / "dl" / "tensor01").exists()
