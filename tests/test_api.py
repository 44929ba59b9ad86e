"""The Python API as the README shows it: sync, merge, load, and their async forms in a running loop."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

import async_embed_sync
from async_embed_sync import load, merge, merge_async, sync, sync_async
from async_embed_sync.errors import DownloadDirLockedError, SyncFailedError
from async_embed_sync.progress import QuietProgress
from async_embed_sync.testing.synthetic import generate_run
from async_embed_sync.transfer.lock import DownloadDirLock


def _remote_run(tmp_path, openssh, write_config):
    remote = tmp_path / "remote"
    generate_run(remote, rows=120, dim=8, gpus_per_cluster=1)
    return write_config(tmp_path, {c: openssh.cluster_entry(str(remote / c)) for c in ("tensor01", "tensor02")})


def test_the_package_exports_the_api():
    assert sorted(async_embed_sync.__all__) == ["load", "merge", "merge_async", "sync", "sync_async"]
    assert callable(async_embed_sync.sync) and async_embed_sync.sync is sync


def test_sync_merge_load_with_defaults_in_the_working_directory(openssh, tmp_path, write_config, monkeypatch):
    _remote_run(tmp_path, openssh, write_config)
    monkeypatch.chdir(tmp_path)  # ./credentials.json, embeddings/checkpoints, as the CLI

    report = sync()
    assert report.ok and report.clusters["tensor01"].downloaded == 1
    merged = merge(output="embeddings/merged")
    assert merged.total_articles == 110
    result = load("embeddings/merged")
    assert result["embeddings"].shape == (110, 8)


def test_sync_takes_the_settle_window_as_a_keyword(openssh, tmp_path, write_config):
    config = _remote_run(tmp_path, openssh, write_config)
    [piece] = (tmp_path / "remote" / "tensor01").iterdir()
    os.utime(piece)  # written just now: still being written, under the default 60 s
    with pytest.raises(SyncFailedError) as caught:  # a file still being written: the sync is not complete
        sync(config, download_dir=tmp_path / "dl", progress=QuietProgress())
    assert caught.value.report.still_writing == {"tensor01": [piece.name]}
    report = sync(config, download_dir=tmp_path / "dl", progress=QuietProgress(), settle=0)
    assert report.ok and report.clusters["tensor01"].downloaded == 1


def test_sync_takes_the_download_directory_lock(openssh, tmp_path, write_config):
    config = _remote_run(tmp_path, openssh, write_config)
    with DownloadDirLock(tmp_path / "dl"):
        with pytest.raises(DownloadDirLockedError):
            sync(config, download_dir=tmp_path / "dl")
    assert not (tmp_path / "dl" / "tensor01").exists()


def test_inside_a_running_event_loop_as_in_a_notebook(openssh, tmp_path, write_config):
    config = _remote_run(tmp_path, openssh, write_config)

    async def notebook_cell():
        # Plain calls work in a cell (they run their own loop on a thread), and so does await.
        first = sync(config, clusters=["tensor01"], download_dir=tmp_path / "dl")
        second = await sync_async(config, download_dir=tmp_path / "dl")
        merged = await merge_async(tmp_path / "dl", tmp_path / "merged.pkl")
        return first, second, merged

    first, second, merged = asyncio.run(notebook_cell())
    assert first.ok and list(first.clusters) == ["tensor01"]
    assert second.ok and second.clusters["tensor01"].skipped == 1  # already here
    assert merged.total_articles == 110
    assert os.path.getsize(tmp_path / "merged.pkl") > 0


def test_a_library_sync_shows_the_configuration_warnings_as_the_cli_does(openssh, tmp_path, write_config):
    """In a plain interpreter (a script, a notebook), with no logging set up by the caller."""
    remote = tmp_path / "remote"
    generate_run(remote, rows=40, dim=8, gpus_per_cluster=1)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01"),
                                                                        password="not-used")})
    config.chmod(0o640)
    script = ("import sys, async_embed_sync\n"
              "report = async_embed_sync.sync(sys.argv[1], download_dir=sys.argv[2])\n"
              "assert report.ok, report.clusters\n")
    done = subprocess.run([sys.executable, "-c", script, str(config), str(tmp_path / "dl")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (f"{config} holds a password and is readable by group or others (mode 0640); "
            f"fix it with: chmod 600 {config}") in done.stderr
    assert "not-used" not in done.stderr
