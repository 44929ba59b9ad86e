"""The disk: a sync whose files do not fit is refused before it fetches anything, in one
line per cluster (needs X, Y free on MOUNT); a disk that fills anyway is one paragraph
per cluster, and leaves no temporary file behind."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from reliability_helpers import assert_journal_readable, assert_mirrored, make_files, sync_in_process

from async_embed_sync.errors import LocalFileError, NotEnoughSpaceError, SyncFailedError
from async_embed_sync.layout import DownloadLayout, free_space, write_atomically
from async_embed_sync.testing.memory_remote import MemoryServer

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str = "20m"):
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs: {mounted.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def _temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


async def test_files_that_do_not_fit_are_refused_before_any_is_fetched(tmp_path, embedded_server, write_config):
    make_files(tmp_path / "srv" / "ckpt", {f"part{i}.pkl": 10 * MiB for i in range(3)})
    with _tmpfs(tmp_path / "small") as small:
        download_dir = small / "dl"
        async with embedded_server(tmp_path / "srv") as server:
            config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
            report = await sync_in_process(config, download_dir)
        cluster = report.clusters["tensor01"]
        [failure] = cluster.failures
        assert isinstance(failure, NotEnoughSpaceError) and not failure.rerun_fixes
        assert failure.cause == f"needs 30.0 MiB, 20.0 MiB free on {small}"
        assert cluster.transferred == 0 and cluster.downloaded == 0
        assert not any(path.is_file() and path.stat().st_size for path in download_dir.rglob("*")), \
            "nothing was fetched"
        with pytest.raises(SyncFailedError) as raised:
            report.raise_for_failures()
        assert f"tensor01: needs 30.0 MiB, 20.0 MiB free on {small}, 3 of 3 files missing (fix this first" \
               in str(raised.value)


async def test_a_disk_that_fills_anyway_is_one_paragraph_and_leaves_no_temporary_file(
        tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {f"part{i}.pkl": 6 * MiB for i in range(5)})
    with _tmpfs(tmp_path / "small") as small:
        download_dir = small / "dl"
        async with embedded_server(tmp_path / "srv") as server:
            config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
            # The free space as a server-side quota or another writer makes it: it looked enough.
            report = await sync_in_process(config, download_dir, free_space=lambda d: (10**12, str(small)))
        cluster = report.clusters["tensor01"]
        assert len(cluster.failures) == 1, cluster.errors
        [failure] = cluster.failures
        assert isinstance(failure, LocalFileError) and "No space left on device" in str(failure)
        assert cluster.downloaded < 5
        assert _temporaries(download_dir) == []
        assert_journal_readable(download_dir)
        assert_mirrored(remote, download_dir / "tensor01",
                        sorted(p.name for p in (download_dir / "tensor01").iterdir() if not p.name.startswith(".")))


def test_write_atomically_removes_its_temporary_file_when_the_disk_is_full(tmp_path):
    with _tmpfs(tmp_path / "small", "1m") as small:
        (small / "filler").write_bytes(b"x" * (1024 * 1024 - 8192))
        with pytest.raises(OSError):
            write_atomically(small / "state.json", b"y" * 64 * 1024)
        assert _temporaries(small) == [] and not (small / "state.json").exists()


def test_free_space_names_the_mount_point(tmp_path):
    with _tmpfs(tmp_path / "small") as small:
        free, mount = free_space(small / "not" / "made" / "yet")
        assert mount == str(small) and 19 * MiB < free <= 20 * MiB


def _serve(tmp_path, clusters: dict[str, dict[str, int]]) -> MemoryServer:
    for seed, (cluster, files) in enumerate(clusters.items()):
        make_files(tmp_path / "srv" / cluster, files, seed=seed)
    return MemoryServer.serving(tmp_path / "srv")


async def test_each_cluster_is_checked_against_what_the_others_reserved(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": MiB, "b.pkl": MiB}, "tensor02": {"c.pkl": MiB, "d.pkl": MiB}})
    config = write_config(tmp_path, server.entries())
    report = await sync_in_process(config, tmp_path / "dl", connect=server.connect,
                                   free_space=lambda d: (3 * MiB, "/mnt/x"))
    refused = [c for c in report.clusters.values() if c.failures]
    fetched = [c for c in report.clusters.values() if not c.failures]
    assert len(refused) == 1 and len(fetched) == 1
    assert [f.cause for f in refused[0].failures] == ["needs 2.0 MiB, 1.0 MiB free on /mnt/x"]
    assert refused[0].transferred == 0 and fetched[0].downloaded == 2


async def test_verified_bytes_kept_are_not_counted_again(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": 2 * MiB, "b.pkl": MiB}})
    server.file("tensor01", "a.pkl").drop_at = [MiB + 5]
    server.clusters["tensor01"].refused = set(range(1, 10))  # every reconnect after the drop
    config = write_config(tmp_path, server.entries())
    first = await sync_in_process(config, tmp_path / "dl", connect=server.connect, retries=1,
                                  free_space=lambda d: (3 * MiB, "/mnt/x"))
    assert first.clusters["tensor01"].failures, "the drop gives the files up with what they kept"
    layout = DownloadLayout(tmp_path / "dl")
    sizes = {"a.pkl": 2 * MiB, "b.pkl": MiB}
    states = {name: layout.load_state("tensor01", name) for name in sizes}
    assert states["a.pkl"].verified_offset >= MiB, states
    # What is still to fetch: the sizes listed, less the verified bytes kept (of files not complete).
    needed = sum(size - (0 if states[name] is None or states[name].complete else states[name].verified_offset)
                 for name, size in sizes.items()
                 if states[name] is None or not states[name].complete)
    assert needed < 3 * MiB - MiB // 2
    server.clusters["tensor01"].refused = set()
    short = await sync_in_process(config, tmp_path / "dl", connect=server.connect,
                                  free_space=lambda d: (needed - 1, "/mnt/x"))
    [refusal] = short.clusters["tensor01"].failures
    assert isinstance(refusal, NotEnoughSpaceError) and short.transferred == 0
    enough = await sync_in_process(config, tmp_path / "dl", connect=server.connect,
                                   free_space=lambda d: (needed, "/mnt/x"))
    assert enough.ok, enough.clusters["tensor01"].errors
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")
