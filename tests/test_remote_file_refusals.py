"""A listed file the server will not give: the account may not read it (said at once,
as a fix, not a rerun), or it was deleted after the listing (its own outcome, left out
of the listing the merge takes). The other files go on."""

from __future__ import annotations

import os
import time
from pathlib import Path

import asyncssh
import pytest
from reliability_helpers import MiB, assert_mirrored, make_files, sync_in_process

from async_embed_sync.config import ClusterConfig
from async_embed_sync.errors import RemoteFileDeniedError, RemoteFileGoneError, SyncFailedError, TransferError
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.transfer.shell import ShellFiles

pytestmark = pytest.mark.anyio


def _refusing(name: str, refusal):
    """An SFTP server whose ``open`` of ``name`` answers ``refusal()`` (after ``before(path)``)."""
    opens: list[str] = []

    class Refusing(asyncssh.SFTPServer):
        def open(self, path, pflags, attrs):
            if os.fsdecode(path).endswith("/" + name):
                opens.append(os.fsdecode(path))
                refusal(self.map_path(path))
            return super().open(path, pflags, attrs)

    return Refusing, opens


def _deny(path):
    raise asyncssh.SFTPPermissionDenied("Permission denied")


async def _sync_refusing_b(tmp_path, embedded_server, write_config, refuse):
    """Three files, b.pkl refused at its open by ``refuse``: the remote folder, the report, the
    opens of b.pkl, the seconds the sync took."""
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": MiB, "b.pkl": 2 * MiB, "c.npy": 300_000})
    factory, opens = _refusing("b.pkl", refuse)
    async with embedded_server(tmp_path / "srv", sftp_factory=factory) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        started = time.monotonic()
        report = await sync_in_process(config, tmp_path / "dl", backoff=0.5)
        return remote, report, opens, time.monotonic() - started


async def test_a_file_the_account_may_not_read_is_said_at_once_as_a_fix(tmp_path, embedded_server, write_config):
    remote, report, opens, elapsed = await _sync_refusing_b(tmp_path, embedded_server, write_config, _deny)
    cluster = report.clusters["tensor01"]
    assert len(opens) == 1, "not retried"
    assert elapsed < 5, elapsed
    [failure] = cluster.failures
    assert isinstance(failure, RemoteFileDeniedError) and not failure.rerun_fixes
    assert str(failure) == (
        "Cluster 'tensor01': permission denied: the account 'tester' may not read /ckpt/b.pkl (another owner, "
        "or mode 600?). Ask its owner to make it readable (chmod a+r, or g+r with a shared group), or leave it "
        "out with the cluster's `patterns`; the other files were synced.")
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl", "c.npy"])
    with pytest.raises(SyncFailedError) as raised:
        report.raise_for_failures()
    assert not raised.value.rerun_fixes
    assert "tensor01: permission denied reading b.pkl as 'tester', 1 of 3 files missing " \
           "(fix this first: a rerun alone will not)" in str(raised.value)


async def test_a_file_deleted_after_the_listing_is_its_own_outcome_and_left_out(tmp_path, embedded_server,
                                                                               write_config):
    remote, report, opens, elapsed = await _sync_refusing_b(
        tmp_path, embedded_server, write_config, lambda path: Path(os.fsdecode(path)).unlink(missing_ok=True))
    cluster = report.clusters["tensor01"]
    assert len(opens) == 1 and elapsed < 5, (opens, elapsed)
    assert report.ok and cluster.gone == ["b.pkl"], cluster.errors
    assert cluster.files == 2 and cluster.downloaded == 2
    assert "tensor01: b.pkl deleted on the cluster after the listing (a purge, or a re-split in progress?): " \
           "not fetched, and left out of the listing the merge takes." in report.summary()
    assert sorted(DownloadLayout(tmp_path / "dl").load_listing("tensor01")) == ["a.pkl", "c.npy"]
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")


@pytest.mark.parametrize("stderr, expected", [
    ("tail: cannot open '/ckpt/b.pkl' for reading: Permission denied", RemoteFileDeniedError),
    ("dd: failed to open '/ckpt/b.pkl': Permission denied", RemoteFileDeniedError),
    ("stat: cannot statx '/ckpt/b.pkl': No such file or directory", RemoteFileGoneError),
    ("tail: cannot open '/ckpt/b.pkl' for reading: No such file or directory", RemoteFileGoneError),
    ("tail: error reading '/ckpt/b.pkl': Input/output error", TransferError),
])
def test_the_exec_path_words_a_refused_or_deleted_file_as_sftp_does(stderr, expected):
    files = ShellFiles(None, ClusterConfig(name="tensor01", host="h", remote_dir="/ckpt"), username="alice")
    error = files.file_error("b.pkl", stderr)
    assert type(error) is expected
    if expected is RemoteFileDeniedError:
        assert "the account 'alice' may not read /ckpt/b.pkl" in str(error) and not error.rerun_fixes
