"""SIGKILL of the tool at exact points of its durability protocol, then a
normal run: the output is byte-identical, and the journal was never torn.

The tool runs in a child interpreter against the real sshd. A hook patched
into the child (``os.fsync``, ``os.replace`` or ``os.write``, counting only
calls on the path it is aimed at) sends the child SIGKILL at the Nth such
call: the trigger is a position in the protocol, never a time.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
from reliability_helpers import (
    MiB,
    assert_journal_readable,
    assert_mirrored,
    assert_no_wrong_file_in_place,
    ignores_sigint,
    make_files,
    run_cli_child,
    start_cli_child,
    sync_argv,
)

from async_embed_sync.cli import EXIT_TERMINATED, main
from async_embed_sync.config import load_config
from async_embed_sync.layout import DownloadLayout
from async_embed_sync import load
from async_embed_sync.progress import QuietProgress
from async_embed_sync.testing.synthetic import generate_run
from async_embed_sync.transfer.download import CHECKPOINT_BYTES
from async_embed_sync.transfer.remote import CHUNK_BYTES
from async_embed_sync.transfer.sync import SyncOptions, sync

# 2.5 checkpoint intervals: journal saves at 8 and 16 MiB, at the end of the
# transfer, and once more when the file is complete.
BIG = "a.pkl"
BIG_SIZE = 2 * CHECKPOINT_BYTES + 4 * MiB + 123
SMALL = "b.npy"
SMALL_SIZE = 3 * MiB + 7
# What the hooks match in a path: a.pkl's partial, and its state file's
# temporary (written, then renamed over the state).
_LAYOUT = DownloadLayout("dl")
BIG_PARTIAL = _LAYOUT.partial_path("tensor01", BIG).name
BIG_STATE_TEMPORARY = f"{_LAYOUT.state_path('tensor01', BIG).name}."

# ``kind`` is the patched os function; it fires on the ``nth`` call whose
# path contains ``match``. ``os.write`` writes half of its bytes first: a
# state file torn mid-write.
_KILL_HOOK = """
import os, signal, threading
_KIND, _MATCH, _NTH = {kind!r}, {match!r}, {nth!r}
_calls = 0
_count_lock = threading.Lock()

def _path(target):
    if isinstance(target, int):
        try:
            return os.readlink(f"/proc/self/fd/{{target}}")
        except OSError:
            return ""
    return os.fspath(target)

def _due(target):
    global _calls
    if _MATCH not in _path(target):
        return False
    with _count_lock:
        _calls += 1
        return _calls == _NTH

def _die():
    os.kill(os.getpid(), signal.SIGKILL)

_original = getattr(os, _KIND)
if _KIND == "write":
    def _hooked(fd, data):
        if _due(fd):
            _original(fd, bytes(data)[: len(data) // 2])
            _die()
        return _original(fd, data)
elif _KIND == "replace":
    def _hooked(source, destination, **kwargs):
        if _due(source):
            _die()
        return _original(source, destination, **kwargs)
elif _KIND == "pwrite":
    def _hooked(fd, data, offset):
        if _due(fd):
            _die()
        return _original(fd, data, offset)
else:
    def _hooked(fd):
        if _due(fd):
            _die()
        return _original(fd)
setattr(os, _KIND, _hooked)
"""

# (kind, match, nth, the moment it stands for). Only a.pkl's files match, so
# the counts do not depend on how its transfer interleaves with b.npy's.
KILL_POINTS = [
    ("fsync", BIG_PARTIAL, 1, "first checkpoint: partial not yet durable"),
    ("write", BIG_STATE_TEMPORARY, 1, "first journal save torn mid-write"),
    ("replace", BIG_STATE_TEMPORARY, 1, "first journal save written and fsynced, not yet renamed"),
    ("fsync", BIG_PARTIAL, 2, "second checkpoint"),
    ("write", BIG_STATE_TEMPORARY, 3, "journal save at the end of the transfer torn"),
    ("replace", BIG_PARTIAL, 1, "complete partial fsynced, not yet renamed into place"),
    ("write", BIG_STATE_TEMPORARY, 4, "journal save marking the file complete torn"),
]


@pytest.mark.parametrize("kind, match, nth, moment", KILL_POINTS,
                         ids=[f"{k}-{m.split('.', 2)[-1]}-{n}" for k, m, n, _ in KILL_POINTS])
def test_sigkill_at_each_durability_step_then_the_next_run_is_identical(
        openssh, tmp_path, write_config, kind, match, nth, moment):
    remote = make_files(tmp_path / "remote", {BIG: BIG_SIZE, SMALL: SMALL_SIZE})
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    download_dir = tmp_path / "dl"
    argv = sync_argv(config, download_dir, "--max-parallel", "2")

    killed = run_cli_child(argv, _KILL_HOOK.format(kind=kind, match=match, nth=nth))

    assert killed.returncode == -signal.SIGKILL, f"never reached '{moment}': {killed.stderr}"
    assert_journal_readable(download_dir)
    assert_no_wrong_file_in_place(remote, download_dir / "tensor01")
    state = DownloadLayout(download_dir).load_state("tensor01", BIG)
    assert state is None or not state.complete, "a file was marked complete before it was in place"

    assert main(argv) == 0
    assert_mirrored(remote, download_dir / "tensor01")
    documents = assert_journal_readable(download_dir)
    assert len(documents) == 2 and all(d["complete"] for d in documents)


def test_a_verified_prefix_survives_the_kill_and_is_not_fetched_again(openssh, tmp_path, write_config):
    """Killed right after the second journal save: the next run asks only for the rest."""
    remote = make_files(tmp_path / "remote", {BIG: BIG_SIZE})
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    download_dir = tmp_path / "dl"
    argv = sync_argv(config, download_dir)

    # The third partial fsync comes after the second checkpoint's state is saved.
    killed = run_cli_child(argv, _KILL_HOOK.format(kind="fsync", match=BIG_PARTIAL, nth=3))

    assert killed.returncode == -signal.SIGKILL
    state = DownloadLayout(download_dir).load_state("tensor01", BIG)
    # A checkpoint falls on the first chunk boundary past each interval (a
    # chunk: the blocks that arrived together, up to CHUNK_BYTES).
    assert 2 * CHECKPOINT_BYTES <= state.verified_offset < 2 * (CHECKPOINT_BYTES + CHUNK_BYTES)
    report = sync(load_config(config).select(None), str(download_dir), QuietProgress(), SyncOptions())
    assert report.ok and report.clusters["tensor01"].resumed == 1
    assert report.transferred == BIG_SIZE - state.verified_offset
    assert_mirrored(remote, download_dir / "tensor01")


def _merge_argv(download_dir, output):
    return ["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]


def _assert_merged_as_if_uninterrupted(download_dir, output):
    reference = output.parent.parent / "reference" / output.name
    assert main(_merge_argv(download_dir, reference)) == 0
    merged, expected = load(output), load(reference)
    assert np.array_equal(merged["embeddings"], expected["embeddings"])
    assert merged["articles"] == expected["articles"]
    assert merged["total_articles"] == expected["total_articles"] == 1200 - 10


@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_sigkill_mid_merge_then_the_next_merge_is_complete_and_equal(tmp_path, output_name):
    """Killed at the third row write into the staged output: nothing at the
    output path; the next merge produces what an uninterrupted one does."""
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=1200, dim=64, files_per_gpu=2, fmt="mixed")
    output = tmp_path / "out" / output_name
    argv = _merge_argv(download_dir, output)

    killed = run_cli_child(argv, _KILL_HOOK.format(kind="pwrite", match=f"{output_name}.", nth=3))

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not output.exists()
    assert main(argv) == 0
    _assert_merged_as_if_uninterrupted(download_dir, output)


# At the 3rd row write into the staged output, the child says so and waits
# for a signal, which the test sends from outside.
_PAUSE_HOOK = """
import os, signal, sys
_MATCH = {match!r}
_calls = 0
_original = os.pwrite

def _hooked(fd, data, offset):
    global _calls
    if _MATCH in os.readlink(f"/proc/self/fd/{{fd}}"):
        _calls += 1
        if _calls == 3:
            print("paused", flush=True)
            signal.pause()
    return _original(fd, data, offset)
os.pwrite = _hooked
"""


@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_sigterm_mid_merge_with_sigint_ignored_exits_143_and_leaves_nothing(tmp_path, output_name):
    """A merge started as `cmd &` starts it (SIGINT ignored), stopped by SIGTERM
    mid-copy: one line, exit 143, nothing at the output path and no staging
    left; the same command then merges what an uninterrupted merge does."""
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=1200, dim=64, files_per_gpu=2, fmt="mixed")
    output = tmp_path / "out" / output_name
    argv = _merge_argv(download_dir, output)

    child = start_cli_child(argv, _PAUSE_HOOK.format(match=f"{output_name}."), sigint_ignored=True)
    try:
        assert child.stdout.readline() == "paused\n", child.communicate()[1]
        assert ignores_sigint(child.pid)
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()

    assert child.returncode == EXIT_TERMINATED, stderr
    assert stderr.startswith("Terminated.") and stderr.count("\n") == 1, stderr
    assert "the merge starts over when run again" in stderr and "resume" not in stderr, stderr
    # No output, no staging, and not the folder the merge made for its output.
    assert not output.parent.exists()
    assert main(argv) == 0
    _assert_merged_as_if_uninterrupted(download_dir, output)
