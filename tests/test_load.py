"""Load: many small files and several large ones over two clusters, at
``--max-parallel`` 1, 4 and 32: every file identical, and the memory of the
tool bounded by the reads in flight, whatever the size of the files.

The CLI runs in a child process (its peak memory is its own); the SSH
servers are embedded in the test's process, on its event loop. Memory is the
child's ``VmHWM`` (peak resident set) read from /proc at exit: unlike
``ru_maxrss``, it starts afresh at exec instead of inheriting the forked
test process's peak.
"""

from __future__ import annotations

import asyncio
import random
import sys

import pytest
from reliability_helpers import REPO_ROOT, MiB, assert_mirrored, make_files, sync_argv

from async_embed_sync.transfer.remote import READ_AHEAD_BYTES

pytestmark = pytest.mark.anyio

CLUSTERS = ("tensor01", "tensor02")
_REPORT_PEAK_MEMORY = """
import atexit

def _report_peak_memory():
    with open("/proc/self/status") as status:
        peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print("peak_rss_bytes", peak_kib * 1024, flush=True)

atexit.register(_report_peak_memory)
import sys
from async_embed_sync.cli import main
sys.exit(main(sys.argv[1:]))
"""
# Beyond the reads in flight: the interpreter's arenas, asyncssh's packet
# buffers and each file's block in the write thread vary by a few MiB from
# run to run.
MEMORY_SLACK = 24 * MiB


async def _sync_in_child(config, download_dir, max_parallel: int) -> int:
    """Run the sync CLI in a child; return its peak resident memory in bytes."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _REPORT_PEAK_MEMORY,
        *sync_argv(config, download_dir, "--max-parallel", str(max_parallel)),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(child.communicate(), 120)
    assert child.returncode == 0, stderr.decode()
    return int(stdout.decode().split("peak_rss_bytes")[-1])


def _trees(root, count: int, smallest: int, largest: int, seed: int) -> dict:
    rng = random.Random(seed)
    return {cluster: make_files(root / cluster, {f"emb_{i:03d}.pkl": rng.randrange(smallest, largest)
                                                 for i in range(count)}, seed=rng.random())
            for cluster in CLUSTERS}


# One file at a time, and every large file in flight at once (8 a cluster): the two ends of the bound.
PARALLELISM = (1, 32)


async def test_many_small_and_several_large_files_identical_and_memory_bounded(
        tmp_path, embedded_server, write_config):
    """Peak memory of a run over large files, less that of a run over small
    files at the same parallelism, stays within the reads in flight
    (files in flight x READ_AHEAD_BYTES) plus a constant; and a single 64 MiB
    file costs no more than a single file of 8-16 MiB: nothing is held per
    file beyond its read window."""
    trees = {
        "small": _trees(tmp_path / "small", 64, 16 * 1024, 64 * 1024, seed=1),
        "large": _trees(tmp_path / "large", 8, 8 * MiB, 16 * MiB, seed=2),
    }
    huge = make_files(tmp_path / "huge" / "tensor01", {"emb_huge.pkl": 64 * MiB}, seed=3)
    peaks = {}
    async with embedded_server(tmp_path) as server:
        for kind, dirs in trees.items():
            config = write_config(tmp_path / kind, {c: server.cluster_entry(f"/{kind}/{c}") for c in dirs})
            for max_parallel in PARALLELISM:
                download_dir = tmp_path / f"dl_{kind}_{max_parallel}"
                peaks[kind, max_parallel] = await _sync_in_child(config, download_dir, max_parallel)
                for cluster, remote_dir in dirs.items():
                    assert_mirrored(remote_dir, download_dir / cluster)
        config = write_config(tmp_path / "huge", {"tensor01": server.cluster_entry("/huge/tensor01")})
        peaks["huge", 1] = await _sync_in_child(config, tmp_path / "dl_huge", 1)
        assert_mirrored(huge, tmp_path / "dl_huge" / "tensor01")

    for max_parallel in PARALLELISM:
        files_in_flight = min(max_parallel, 8 * len(CLUSTERS))
        growth = peaks["large", max_parallel] - peaks["small", max_parallel]
        assert growth <= files_in_flight * READ_AHEAD_BYTES + MEMORY_SLACK, (max_parallel, growth, peaks)
    # Four times the file size, not one byte more of memory than the window allows.
    assert peaks["huge", 1] - peaks["small", 1] <= READ_AHEAD_BYTES + MEMORY_SLACK, peaks
