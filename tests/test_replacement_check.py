"""A changed remote file replaces a verified copy here only once the new version is
complete, verified and readable as a checkpoint: a truncated one stays a partial, the
old copy stays in place (and in the listing the merge takes), and the change is named."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from reliability_helpers import sync_in_process

from async_embed_sync.api import merge
from async_embed_sync.progress import QuietProgress
from async_embed_sync.errors import CheckpointError, NotACheckpointError, SyncFailedError
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.merging.checkpoints import LegacyCheckpoint
from async_embed_sync.testing.synthetic import make_rows, make_vectors, write_legacy_checkpoint

pytestmark = pytest.mark.anyio


def checkpoint_problem(path: Path, name: str) -> str | None:
    """What the CLI passes (through the merge's reader): why ``path`` is no readable checkpoint."""
    if not name.endswith(".pkl"):
        return None
    try:
        LegacyCheckpoint(path, cluster="-").info  # noqa: B018
    except CheckpointError as exc:
        return exc.problem
    return None


def _checkpoint(path: Path, rows: int = 4000, start: int = 0) -> bytes:
    write_legacy_checkpoint(path, make_vectors(start, start + rows, dim=64, seed=1),
                            make_rows(start, start + rows, seed=1, text_bytes=200, question_indices=set()),
                            start_index=start)
    return path.read_bytes()


async def test_a_truncated_remote_file_does_not_replace_the_verified_copy(tmp_path, embedded_server,
                                                                          write_config):
    remote = tmp_path / "srv" / "ckpt"
    good = _checkpoint(remote / "a.pkl")
    _checkpoint(remote / "b.pkl", rows=100, start=4000)
    layout = DownloadLayout(tmp_path / "dl")
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        first = await sync_in_process(config, tmp_path / "dl", check_checkpoint=checkpoint_problem)
        assert first.ok
        verified = layout.load_state("tensor01", "a.pkl")
        # The cluster's copy is cut short (a scratch file system's quota, a crashed rewrite).
        cut = len(good) * 2 // 3
        with open(remote / "a.pkl", "r+b") as f:
            f.truncate(cut)
        hour_ago = time.time() - 3600
        os.utime(remote / "a.pkl", (hour_ago, hour_ago))
        second = await sync_in_process(config, tmp_path / "dl", check_checkpoint=checkpoint_problem)
        third = await sync_in_process(config, tmp_path / "dl", check_checkpoint=checkpoint_problem)
    for report in (second, third):
        cluster = report.clusters["tensor01"]
        [failure] = cluster.failures
        assert isinstance(failure, NotACheckpointError) and not failure.rerun_fixes
        assert str(failure).startswith(
            f"Cluster 'tensor01': a.pkl changed on the cluster (cut from the {len(good) / 2**20:.1f} MiB verified "
            f"here to {cut / 2**20:.1f} MiB), and the new version is not a readable checkpoint ("), str(failure)
        assert "the verified copy here was kept, and the new version stays a partial" in str(failure)
        with pytest.raises(SyncFailedError) as raised:
            report.raise_for_failures()
        assert "tensor01: a changed file on the cluster is not a readable checkpoint" in str(raised.value)
    assert third.transferred == 0, "the new version, kept as a partial, is not fetched again"
    # The verified copy is in place, its record intact; the listing the merge takes names it.
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == good
    assert layout.load_state("tensor01", "a.pkl") == verified
    assert layout.partial_path("tensor01", "a.pkl").stat().st_size == cut
    assert _listing(layout)["a.pkl"] == [len(good), verified.remote_mtime]
    # So the merge takes the verified copy, as the last good sync left it.
    result = merge(tmp_path / "dl", tmp_path / "merged.pkl", progress=QuietProgress())
    assert result.total_articles == 4100, result


async def test_a_changed_file_that_reads_as_a_checkpoint_replaces_the_copy(tmp_path, embedded_server,
                                                                           write_config):
    remote = tmp_path / "srv" / "ckpt"
    _checkpoint(remote / "a.pkl")
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        assert (await sync_in_process(config, tmp_path / "dl", check_checkpoint=checkpoint_problem)).ok
        new = _checkpoint(remote / "a.pkl", rows=3000)
        hour_ago = time.time() - 3600
        os.utime(remote / "a.pkl", (hour_ago, hour_ago))
        report = await sync_in_process(config, tmp_path / "dl", check_checkpoint=checkpoint_problem)
    assert report.ok, report.clusters["tensor01"].errors
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == new
    layout = DownloadLayout(tmp_path / "dl")
    assert layout.load_state("tensor01", "a.pkl").remote_size == len(new)
    assert not layout.replacement_state_path("tensor01", "a.pkl").exists()


def _listing(layout: DownloadLayout) -> list[dict]:
    import json

    document = json.loads(layout.listing_path("tensor01").read_text())
    return document["files"]
