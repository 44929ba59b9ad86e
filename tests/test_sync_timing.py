"""What the user sees of time: a line at once when the sync starts, and a summary whose
time and rate run from the end of the login, not from the start (a passphrase typed)."""

from __future__ import annotations

import time

import anyio
import pytest
from reliability_helpers import make_files

from async_embed_sync.config import load_config
from async_embed_sync.progress import Progress, QuietProgress
from async_embed_sync.testing.memory_remote import MemoryServer
from async_embed_sync.transfer.options import SyncOptions
from async_embed_sync.transfer.sync import sync_clusters

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


class Notes(QuietProgress):
    def __init__(self):
        super().__init__()
        self.notes: list[tuple[float, str]] = []

    def note(self, text: str) -> None:
        self.notes.append((time.monotonic(), text))


def _server(tmp_path) -> MemoryServer:
    for seed, cluster in enumerate(("tensor01", "tensor02")):
        make_files(tmp_path / "srv" / cluster, {"a.pkl": MiB}, seed=seed)
    return MemoryServer.serving(tmp_path / "srv")


async def test_the_summary_time_runs_from_the_end_of_the_login(tmp_path, write_config):
    server = _server(tmp_path)
    login = 1.5  # a passphrase typed at the prompt

    async def slow_login(cluster, options):
        await anyio.sleep(login)
        return await server.connect(cluster, options)

    config = write_config(tmp_path, server.entries())
    report = await sync_clusters(load_config(config).select(None), str(tmp_path / "dl"), QuietProgress(),
                                 SyncOptions(connect=slow_login))
    assert report.ok
    for cluster in report.clusters.values():
        assert cluster.seconds < login / 2, cluster.seconds  # the transfer alone: far less than the login


async def test_a_line_says_the_sync_is_connecting_at_once(tmp_path, write_config):
    server = _server(tmp_path)
    progress = Notes()

    async def slow_login(cluster, options):
        await anyio.sleep(1.0)
        return await server.connect(cluster, options)

    config = write_config(tmp_path, server.entries())
    started = time.monotonic()
    report = await sync_clusters(load_config(config).select(None), str(tmp_path / "dl"), progress,
                                 SyncOptions(connect=slow_login))
    assert report.ok
    at, first = progress.notes[0]
    assert first == "connecting to tensor01, tensor02 ..."
    assert at - started < 0.5
    assert isinstance(progress, Progress)
