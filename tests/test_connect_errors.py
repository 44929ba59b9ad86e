"""A connect that fails says why in plain words, never Python's text
("Connect call failed ('127.0.0.1', 46723)", "[Errno 113]", "gaierror").

The real failures are met where they can be made on loopback (a closed port
against the real sshd: ``test_sync_openssh.py::test_unreachable_host_fails_alone``;
a name under ``.invalid``, which never resolves, here); the others, which
need a network that misbehaves, are raised as the socket layer raises them
into the one translation place, ``ssh.translate_errors``.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from async_embed_sync.config import load_config
from async_embed_sync.errors import ConfigError, ConnectError, TransferError
from async_embed_sync.transfer.remote import ClusterRemote
from async_embed_sync.transfer.ssh import translate_errors
from async_embed_sync.transfer.target import resolve_target

pytestmark = pytest.mark.anyio

ENTRY = {"host": "10.1.2.3", "port": 2222, "username": "alice", "remote_dir": "/ckpt"}


def _target(tmp_path, write_config, **entry):
    (tmp_path / "known_hosts").write_text("")
    config = write_config(tmp_path, {"tensor01": {**ENTRY, "known_hosts": str(tmp_path / "known_hosts"), **entry}})
    return resolve_target(load_config(config).select(None)[0])


@pytest.mark.parametrize(("raised", "words"), [
    # asyncio's own text for a refused connect: errno 111, "Connect call failed (...)".
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed ('10.1.2.3', 2222)"),
     "connection refused: nothing listens on 10.1.2.3:2222"),
    # Each address of the host tried: asyncio joins their errors and sets no errno.
    (OSError("Multiple exceptions: [Errno 111] Connect call failed ('::1', 2222, 0, 0), "
             "[Errno 111] Connect call failed ('10.1.2.3', 2222)"),
     "connection refused: nothing listens on 10.1.2.3:2222"),
    (OSError(errno.EHOSTUNREACH, "Connect call failed ('10.1.2.3', 2222)"), "no route to host 10.1.2.3"),
    (OSError(errno.ENETUNREACH, "Connect call failed ('10.1.2.3', 2222)"),
     "network unreachable: no route to 10.1.2.3 from this machine"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset by the server"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"),
     "broken pipe: the other end closed the connection while data was being sent"),
    (TimeoutError(), "timed out: no answer from 10.1.2.3:2222 in time"),
    (asyncio.TimeoutError(), "timed out: no answer from 10.1.2.3:2222 in time"),
    (OSError(errno.EACCES, "Connect call failed ('10.1.2.3', 2222)"), "permission denied"),
], ids=["refused", "refused-on-every-address", "no-route", "network-unreachable", "reset", "broken-pipe",
        "timeout", "asyncio-timeout", "other-errno"])
def test_a_failed_connect_says_why_in_plain_words(tmp_path, write_config, raised, words):
    target = _target(tmp_path, write_config)
    with pytest.raises(ConnectError) as info, translate_errors(target, connecting=True):
        raise raised
    message = str(info.value)
    assert message.startswith(f"Cluster 'tensor01': cannot connect to 10.1.2.3:2222 ({words}). Check the host "
                              f"name and port"), message
    assert "Connect call failed" not in message and "Errno" not in message, message
    assert info.value.reason == words and info.value.rerun_fixes


def test_a_link_lost_mid_transfer_says_why_in_the_same_words(tmp_path, write_config):
    target = _target(tmp_path, write_config)
    with pytest.raises(TransferError) as info, translate_errors(target, name="a.pkl"):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert str(info.value) == "Cluster 'tensor01': transfer of a.pkl failed: connection lost (connection reset by " \
                              "the server)"


@pytest.mark.parametrize(("code", "words", "transient"), [
    (socket.EAI_NONAME, "name not known: no address found for tensor01.example.org", False),
    (socket.EAI_AGAIN, "the name tensor01.example.org could not be looked up just now (temporary failure in "
                       "name resolution)", True),
])
def test_a_host_name_that_does_not_resolve_is_named(tmp_path, write_config, code, words, transient):
    target = _target(tmp_path, write_config, host="tensor01.example.org")
    with pytest.raises(ConnectError) as info, translate_errors(target, connecting=True):
        raise socket.gaierror(code, "Name or service not known")
    assert f"cannot connect to tensor01.example.org:2222 ({words})." in str(info.value)
    assert info.value.rerun_fixes == transient


async def test_a_name_that_never_resolves_is_named_at_connect(tmp_path, write_config):
    # RFC 6761: no name under .invalid resolves, on any network (or none).
    target = _target(tmp_path, write_config, host="tensor01.invalid")
    with pytest.raises(ConnectError) as info:
        await ClusterRemote.connect(target.cluster, timeout=10)
    message = str(info.value)
    assert ("name not known: no address found for tensor01.invalid" in message
            or "the name tensor01.invalid could not be looked up" in message), message
    assert "Errno" not in message and "gaierror" not in message, message


async def test_a_default_key_that_is_no_key_is_said_before_connecting(tmp_path, write_config, monkeypatch):
    """With no key configured, asyncssh loads ``~/.ssh/id_*`` itself, and lets
    a file there that it cannot read as a key through as ``KeyImportError``
    (the configured keys are loaded, and their problems told, by the login)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEga2V5\n-----END OPENSSH PRIVATE KEY-----\n")
    monkeypatch.setenv("HOME", str(home))
    target = _target(tmp_path, write_config, host="tensor01.invalid")
    with pytest.raises(ConfigError) as info:
        await ClusterRemote.connect(target.cluster, timeout=10)
    key = home / ".ssh" / "id_ed25519"
    assert f"cluster 'tensor01': the key {key} cannot be used (" in str(info.value), str(info.value)
