"""Local files that cannot be used: a file where a folder belongs, a
read-only download directory, a path under a plain file, a name too long.

Each ends as one paragraph naming the path and what to do, exit 1, never a
traceback or an ExceptionGroup, for sync, merge and status; a cluster whose
folder is blocked never stops the others. The triggers work as root (which
chmod does not stop): a plain file in the way (EEXIST, ENOTDIR), a name over
255 bytes (ENAMETOOLONG), a read-only bind mount in a mount namespace of the
child's own (EROFS).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from reliability_helpers import REPO_ROOT, MiB, assert_mirrored, make_files

from async_embed_sync.cli import main
from async_embed_sync.layout import DownloadLayout
from async_embed_sync import load
from async_embed_sync.testing.synthetic import generate_run

CLUSTERS = ("tensor01", "tensor02")


def _assert_one_paragraph(stderr: str, path: Path | str, *phrases: str) -> None:
    """No traceback, no ExceptionGroup; ``path`` is named on exactly one line, with ``phrases``."""
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
    naming = [line for line in stderr.splitlines() if str(path) in line]
    assert len(naming) == 1, stderr
    for phrase in phrases:
        assert phrase in naming[0], stderr


def _remote_run(root: Path) -> Path:
    for index, name in enumerate(CLUSTERS):
        make_files(root / name, {"a.pkl": MiB + index, "b.npy": 64 * 1024 + index}, seed=index)
    return root


def _config(write_config, tmp_path: Path, server) -> Path:
    return write_config(tmp_path, {name: server.cluster_entry(f"/{name}") for name in CLUSTERS})


async def _cli(*argv: str, prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    """``python -m async_embed_sync ARGV`` in a child process; its exit code and stderr."""
    child = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-m", "async_embed_sync", *argv, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await asyncio.wait_for(child.communicate(), 120)
    return child.returncode, stderr.decode()


@pytest.mark.anyio
@pytest.mark.parametrize("blocked", ["cluster folder", "state folder"])
async def test_a_blocked_cluster_folder_fails_that_cluster_only(tmp_path, embedded_server, write_config,
                                                                blocked):
    remote = _remote_run(tmp_path / "srv")
    download_dir = tmp_path / "dl"
    folder = DownloadLayout(download_dir).cluster_folders("tensor01")[blocked == "state folder"]
    folder.parent.mkdir(parents=True)
    folder.write_text("a file where tensor01's folder belongs")

    async with embedded_server(tmp_path / "srv") as server:
        config = _config(write_config, tmp_path, server)
        code, stderr = await _cli("sync", "--config", str(config), "--download-dir", str(download_dir))

    assert code == 1, stderr
    _assert_one_paragraph(stderr, f"Cannot create the folder {folder}: it is a file where a folder is needed",
                          "move it away", "run the same command again")
    assert_mirrored(remote / "tensor02", download_dir / "tensor02")
    summary = {line.split()[0]: line for line in stderr.splitlines() if line.startswith(CLUSTERS)}
    assert summary["tensor01"].endswith("FAILED") and not summary["tensor02"].endswith("FAILED"), stderr
    assert ("did not finish. tensor01: a local file or folder cannot be used, 2 of 2 files missing "
            "(fix this first: a rerun alone will not)") in stderr
    assert folder.read_text() == "a file where tensor01's folder belongs"


@pytest.mark.anyio
async def test_status_names_a_blocked_cluster_folder_and_lists_the_others(
        tmp_path, embedded_server, write_config, capsys):
    _remote_run(tmp_path / "srv")
    download_dir = tmp_path / "dl"
    download_dir.mkdir()
    (download_dir / "tensor01").write_text("in the way")
    async with embedded_server(tmp_path / "srv") as server:
        config = _config(write_config, tmp_path, server)
        # main() in a worker thread: the server lives on the test's loop.
        code = await anyio.to_thread.run_sync(
            main, ["status", "--config", str(config), "--download-dir", str(download_dir)])
    out, err = capsys.readouterr()
    assert code == 1
    _assert_one_paragraph(err, f"Cannot read the folder {download_dir / 'tensor01'}: it is a file where a "
                               f"folder is needed", "tensor01")  # errors on stderr, the table on stdout
    tensor02 = next(line for line in out.splitlines() if line.startswith("tensor02"))
    assert tensor02.split()[1:2] == ["2"], out  # both remote files listed


@pytest.mark.anyio
async def test_a_download_directory_under_a_plain_file_is_one_paragraph(
        tmp_path, embedded_server, write_config, capsys):
    _remote_run(tmp_path / "srv")
    blocker = tmp_path / "plain"
    blocker.write_text("not a folder")
    download_dir = blocker / "dl"
    async with embedded_server(tmp_path / "srv") as server:
        config = _config(write_config, tmp_path, server)
        code, stderr = await _cli("sync", "--config", str(config), "--download-dir", str(download_dir))
        assert code == 1
        _assert_one_paragraph(stderr, f"{blocker} is a file where a folder is needed")
        assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr

        status = await anyio.to_thread.run_sync(
            main, ["status", "--config", str(config), "--download-dir", str(download_dir)])
    out, err = capsys.readouterr()
    assert status == 1
    for name in CLUSTERS:
        row = next(line for line in out.splitlines() if line.startswith(name))
        assert row.split()[1:] == ["error", "(see", "below)"], out  # the paragraph would wrap across the columns
        _assert_one_paragraph(err, f"Cannot read the folder {download_dir / name}: {blocker} is a file where a "
                                   f"folder is needed")
    assert blocker.read_text() == "not a folder"


def _read_only_mount_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return probe.returncode == 0


def _read_only(folder: Path) -> tuple[str, ...]:
    """A command prefix: what follows runs with ``folder`` bind-mounted read-only, in a mount namespace of its own."""
    return ("unshare", "-m", "sh", "-c",
            'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"', str(folder))


needs_mount_namespace = pytest.mark.skipif(not _read_only_mount_works(), reason="needs unshare -m (a mount namespace)")


@pytest.mark.anyio
@needs_mount_namespace
async def test_a_read_only_download_directory_is_one_paragraph(tmp_path, embedded_server, write_config):
    _remote_run(tmp_path / "srv")
    download_dir = tmp_path / "dl"
    download_dir.mkdir()
    async with embedded_server(tmp_path / "srv") as server:
        config = _config(write_config, tmp_path, server)
        code, stderr = await _cli("sync", "--config", str(config), "--download-dir", str(download_dir),
                                  prefix=_read_only(download_dir))
    assert code == 1, stderr
    _assert_one_paragraph(stderr, DownloadLayout(download_dir).state_root, "Read-only file system",
                          "choose a path on a writable one")
    assert list(download_dir.iterdir()) == []


@pytest.mark.anyio
@needs_mount_namespace
@pytest.mark.parametrize("name", ["merged.pkl", "merged"])
async def test_a_read_only_output_folder_is_one_paragraph(tmp_path, name):
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=300, dim=8, gpus_per_cluster=1)
    (tmp_path / "out").mkdir()
    output = tmp_path / "out" / name
    code, stderr = await _cli("merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet",
                              prefix=_read_only(tmp_path / "out"))
    assert code == 1, stderr
    _assert_one_paragraph(stderr, output, "Read-only file system", "Nothing was left at the output path")
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("where", ["parent is a file", "name too long"])
def test_an_unwritable_merge_output_is_one_paragraph(tmp_path, capsys, where):
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=300, dim=8, gpus_per_cluster=1)
    blocker = tmp_path / "plain"
    blocker.write_text("not a folder")
    for suffix in (".pkl", ""):
        output = blocker / f"merged{suffix}" if where == "parent is a file" else tmp_path / ("x" * 300 + suffix)
        code = main(["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"])
        err = capsys.readouterr().err
        assert code == 1
        expected = (f"{blocker} is a file where a folder is needed" if where == "parent is a file"
                    else "longer than the file system allows")
        _assert_one_paragraph(err, output, expected, "Nothing was left at the output path")
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "plain"]
    output = tmp_path / "merged.pkl"
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]) == 0
    assert load(output)["total_articles"] == 290


@pytest.mark.parametrize(("umask", "folder_mode", "file_mode"),
                         [(0o002, 0o775, 0o664), (0o022, 0o755, 0o644), (0o077, 0o700, 0o600)],
                         ids=["umask 002", "umask 022", "umask 077"])
def test_the_output_modes_follow_the_umask(tmp_path, umask, folder_mode, file_mode):
    """A result on a shared file system is as readable as the user's umask
    allows, as any file they make: the bundle folder and every folder and
    file in it, and the legacy pickle."""
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=300, dim=8, gpus_per_cluster=1, fmt="mixed")
    outputs = {"merged.pkl": [], "jsonl": ["--articles-format", "jsonl"],
               "parquet": ["--articles-format", "parquet"]}
    previous = os.umask(umask)
    try:
        for name, extra in outputs.items():
            argv = ["merge", "--download-dir", str(download_dir), "--output", str(tmp_path / "out" / name),
                    "--quiet", *extra]
            assert main(argv) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == folder_mode
    assert stat.S_IMODE((tmp_path / "out" / "merged.pkl").stat().st_mode) == file_mode
    for bundle in ("jsonl", "parquet"):
        entries = [tmp_path / "out" / bundle, *(tmp_path / "out" / bundle).rglob("*")]
        assert len(entries) == 7, entries  # the folder, its two shard folders, two shards, manifest, SHA256SUMS
        assert {str(path): stat.S_IMODE(path.stat().st_mode) for path in entries} == \
            {str(path): folder_mode if path.is_dir() else file_mode for path in entries}


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None
            for path in sorted(root.rglob("*"))}


def test_the_demo_leaves_the_users_files_alone_and_runs_again(tmp_path, capsys):
    """``demo --dir DIR`` on a folder of the user's: their files survive the
    demo and a second one; each demo replaces only what an earlier one made."""
    root = tmp_path / "mydata"
    (root / "notes").mkdir(parents=True)
    (root / "notes" / "todo.txt").write_text("mine")
    (root / "embeddings.npy").write_bytes(b"also mine")
    mine = _tree(root)
    argv = ["demo", "--dir", str(root), "--rows", "1010", "--quiet"]

    for _ in range(2):
        assert main(argv) == 0, capsys.readouterr().err
        assert load(root / "wikipedia_merged.pkl")["total_articles"] == 1000
        after = _tree(root)
        assert {name: after[name] for name in mine} == mine
        made = {name.split("/")[0] for name in set(after) - set(mine)}
        assert made == {".async_embed_sync_demo", "remote", "keys", "checkpoints", "credentials.json",
                        "wikipedia_merged.pkl"}, made


def test_the_demo_refuses_a_folder_holding_an_entry_it_did_not_make(tmp_path, capsys):
    root = tmp_path / "embeddings"
    (root / "checkpoints" / "tensor01").mkdir(parents=True)
    (root / "checkpoints" / "tensor01" / "real.pkl").write_bytes(b"a week of GPU time")
    before = _tree(root)

    assert main(["demo", "--dir", str(root), "--rows", "1010", "--quiet"]) == 1
    err = capsys.readouterr().err
    _assert_one_paragraph(err, root / "checkpoints", "no earlier demo made it", "Choose another --dir")
    assert _tree(root) == before
