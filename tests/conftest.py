"""Shared fixtures: SSH servers, the emulated link, and config files.

Async tests use anyio's pytest plugin (shipped with anyio) on the asyncio
backend only: mark them ``@pytest.mark.anyio`` (or set
``pytestmark = pytest.mark.anyio`` in the module). Plain ``asyncio.run``
inside a sync test works as well.

The ``embedded_server`` and ``link_proxy`` fixtures are factories that
return *unstarted* async context managers, so that the server or proxy lives
on the test's own event loop, whichever way the test runs one::

    async with embedded_server(root) as server, link_proxy(server, cut_after=10**6) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/", port=proxy.port)})

The logic lives in ``async_embed_sync.testing.embedded_server``,
``async_embed_sync.testing.netproxy`` and ``tests/openssh.py``; this file only wires
them to pytest.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openssh import OpenSSHServer, sshd_available

from async_embed_sync.testing.embedded_server import (
    EmbeddedSFTPServer,
    LoopbackSSHAccess,
)
from async_embed_sync.testing.netproxy import LinkProxy
from async_embed_sync.testing.synthetic import finish_writing


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_configuration_of_the_machine(tmp_path_factory: pytest.TempPathFactory,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never find the developer's own configuration (``$ASYNC_EMBED_SYNC_CONFIG``,
    ``~/.config/async_embed_sync/``): only what they write."""
    monkeypatch.delenv("ASYNC_EMBED_SYNC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg_config_home")))


@pytest.fixture(scope="session")
def openssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenSSHServer]:
    """The real OpenSSH sshd, one for the whole session; serves root's whole file system."""
    if not sshd_available():
        message = "OpenSSH sshd is not installed (apt-get install openssh-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # CI installs it: its absence there is a broken setup
        pytest.skip(message)
    with OpenSSHServer(tmp_path_factory.mktemp("openssh")) as server:
        yield server


@pytest.fixture
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., EmbeddedSFTPServer]:
    """``embedded_server(root, **options)``: an unstarted ``EmbeddedSFTPServer`` serving ``root``."""
    def make(root: Path, **options: Any) -> EmbeddedSFTPServer:
        return EmbeddedSFTPServer(root, tmp_path_factory.mktemp("embedded_server"), **options)
    return make


@pytest.fixture
def link_proxy() -> Callable[..., LinkProxy]:
    """``link_proxy(server, **link)``: an unstarted ``LinkProxy`` in front of ``server``."""
    def make(server: LoopbackSSHAccess, **link: Any) -> LinkProxy:
        return LinkProxy(server.host, server.port, **link)
    return make


_TEMP = Path(tempfile.gettempdir())


def _write_config(directory: Path, clusters: dict[str, dict[str, Any]]) -> Path:
    # What the clusters hold by now is a finished run's (a local remote_dir: OpenSSH's).
    for entry in clusters.values():
        remote_dir = Path(str(entry.get("remote_dir", "")))
        if remote_dir.is_relative_to(_TEMP) and remote_dir != _TEMP:  # never the embedded server's "/"
            finish_writing(remote_dir)
    path = Path(directory) / "credentials.json"
    path.write_text(json.dumps({"clusters": clusters}, indent=2))
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def write_config() -> Callable[[Path, dict[str, dict[str, Any]]], Path]:
    """``write_config(directory, {name: entry})``: writes credentials.json, returns its path.
    Files already in a ``remote_dir`` that is a local path are dated as a finished run leaves
    them (a test that wants one still being written writes it afterwards)."""
    return _write_config
