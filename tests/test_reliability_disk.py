"""Disk full during the download and during the merge: a clear error, nothing
corrupted, and the same command finishes once there is room.

"Full" is RLIMIT_FSIZE in a child process (with SIGXFSZ ignored, a write
past the limit fails with EFBIG, as a full disk fails with ENOSPC): the
trigger is a byte count, and it needs no mount, so it works on any CI
machine. Both errors take the same path through the tool (an OSError from a
write).
"""

from __future__ import annotations

import numpy as np
import pytest
from reliability_helpers import (
    MiB,
    assert_journal_readable,
    assert_mirrored,
    assert_no_wrong_file_in_place,
    make_files,
    run_cli_child,
    sync_argv,
)

from async_embed_sync.cli import main
from async_embed_sync.config import load_config
from async_embed_sync.layout import DownloadLayout
from async_embed_sync import load
from async_embed_sync.progress import QuietProgress
from async_embed_sync.testing.synthetic import generate_run
from async_embed_sync.transfer.sync import SyncOptions, sync

_FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def _assert_one_clear_paragraph(stderr: str, *phrases: str) -> None:
    """No traceback; the error (naming the file and the cause) is said once,
    each paragraph on a line of its own; the last line is the ``error:`` one."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), stderr
    assert len(lines) == len(set(lines)), stderr
    for phrase in phrases:
        assert sum(phrase in line for line in lines) == 1, stderr


def test_disk_full_during_the_download_is_a_clear_error_and_the_rerun_resumes(
        openssh, tmp_path, write_config):
    limit = 6 * MiB
    remote = make_files(tmp_path / "remote", {"big.pkl": 14 * MiB + 5, "small.npy": MiB})
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    download_dir = tmp_path / "dl"

    full = run_cli_child(sync_argv(config, download_dir, "--max-parallel", "1"),
                         _FILE_SIZE_LIMIT.format(limit=limit))

    assert full.returncode == 1, full.stderr
    partial = DownloadLayout(download_dir).partial_path("tensor01", "big.pkl")
    _assert_one_clear_paragraph(full.stderr, f"Cannot write {partial}", "File too large",
                                "once this is fixed, run the same command again to resume")
    assert_journal_readable(download_dir)
    assert_no_wrong_file_in_place(remote, download_dir / "tensor01")
    assert not (download_dir / "tensor01" / "big.pkl").exists()
    verified = DownloadLayout(download_dir).load_state("tensor01", "big.pkl").verified_offset
    assert 0 < verified <= limit

    report = sync(load_config(config).select(None), str(download_dir), QuietProgress(), SyncOptions())

    assert report.ok and report.clusters["tensor01"].resumed == 1
    small_fetched_again = 0 if (download_dir / "tensor01" / "small.npy").exists() else MiB
    assert report.transferred <= 14 * MiB + 5 - verified + small_fetched_again + MiB
    assert_mirrored(remote, download_dir / "tensor01")


@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_disk_full_during_the_merge_is_a_clear_error_and_leaves_nothing(tmp_path, output_name):
    """An OSError while writing the output (EFBIG here, ENOSPC on a full
    disk) is one OutputError paragraph, nothing is left behind, and the same
    merge succeeds once space is freed."""
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=2000, dim=768, files_per_gpu=1, fmt="npy")  # ~6 MB of embeddings
    output = tmp_path / "out" / output_name
    argv = ["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]

    full = run_cli_child(argv, _FILE_SIZE_LIMIT.format(limit=2 * MiB))

    assert full.returncode == 1, full.stderr
    _assert_one_clear_paragraph(full.stderr, str(output), "File too large")
    assert not output.exists()
    assert not output.parent.exists() or list(output.parent.iterdir()) == []

    assert main(argv) == 0
    merged = load(output)
    assert merged["embeddings"].shape == (2000 - 10, 768)  # the 10 questions are dropped
    assert np.isfinite(merged["embeddings"]).all()
