"""The scheduler and the download through the seam above SSH: clusters served
from memory (``testing/memory_remote.py``) with scripted faults, each test in
a fraction of a second. The protocol itself is tested against real servers
(test_sync_faults.py, test_reliability_transfer.py, test_sync_openssh.py)."""

from __future__ import annotations

import time

import pytest
from reliability_helpers import assert_mirrored, make_files, sync_in_process

from async_embed_sync.errors import LinkLostError, SyncFailedError, VerificationError
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.testing.memory_remote import MemoryServer

pytestmark = pytest.mark.anyio

KiB = 1024
MiB = 1024 * KiB


def _serve(tmp_path, sizes: dict[str, dict[str, int]], **options) -> MemoryServer:
    """Seeded files on disk (for ``assert_mirrored``), served from memory."""
    for seed, (cluster, files) in enumerate(sizes.items()):
        make_files(tmp_path / "srv" / cluster, files, seed=seed)
    return MemoryServer.serving(tmp_path / "srv", **options)


async def _sync(tmp_path, write_config, server: MemoryServer, **options):
    config = write_config(tmp_path, server.entries())
    return await sync_in_process(config, tmp_path / "dl", connect=server.connect, **options)


async def test_a_drop_resumes_at_the_verified_offset_and_nothing_is_fetched_twice(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": MiB}})
    server.file("tensor01", "a.pkl").drop_at = [300_000]
    report = await _sync(tmp_path, write_config, server)
    cluster = report.clusters["tensor01"]
    assert report.ok, cluster.errors
    assert server.offsets("tensor01", "a.pkl") == [0, 300_000]  # the second read starts where the first stopped
    assert server.served["tensor01", "a.pkl"] == MiB
    assert server.connects["tensor01"] == 2 and cluster.reconnects == 1 and cluster.resumed == 1
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")


async def test_a_drop_fails_every_file_in_flight_and_one_reconnect_resumes_them_all(tmp_path, write_config):
    names = [f"part{i}.pkl" for i in range(3)]
    server = _serve(tmp_path, {"tensor01": dict.fromkeys(names, MiB)})
    server.file("tensor01", "part1.pkl").drop_at = [200_000]
    server.clusters["tensor01"].chunk_delay = 0.005  # the three move together, however busy the machine is
    report = await _sync(tmp_path, write_config, server, max_parallel=3)
    assert report.ok, report.clusters["tensor01"].errors
    assert server.connects["tensor01"] == 2  # the link reconnects once, for every file
    for name in names:
        first, second = server.offsets("tensor01", name)
        assert first == 0 and second > 0, (name, first, second)  # each was in flight, and resumed
    assert server.served.total() == 3 * MiB
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")


async def test_a_file_that_changes_mid_copy_stays_a_partial_and_the_next_sync_takes_its_new_version(
        tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": MiB, "b.npy": 64 * KiB}})
    new_version = b"v2" * (700 * KiB)
    file = server.file("tensor01", "a.pkl")
    file.change_at, file.changed_to = 300_000, new_version
    report = await _sync(tmp_path, write_config, server)
    # Not copied again in this run: it would change under the next copy too.
    assert server.offsets("tensor01", "a.pkl") == [0]
    assert report.still_writing == {"tensor01": ["a.pkl"]} and not report.clusters["tensor01"].failures
    [said] = report.clusters["tensor01"].still_writing
    assert str(said).startswith("Cluster 'tensor01': a.pkl is still being written (it ")
    assert "nothing was put in its place. Run again once its job has finished writing it, or add --follow" in str(said)
    with pytest.raises(SyncFailedError, match=r"tensor01: still being written there: a\.pkl \(run again"):
        report.raise_for_failures()
    assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01", ["b.npy"])

    # The next sync resumes the partial; its prefix was of the old version, which
    # the server's hash of the whole file tells: fetched again whole, once.
    report = await _sync(tmp_path, write_config, server)
    assert report.ok, report.clusters["tensor01"].errors
    assert server.offsets("tensor01", "a.pkl")[1:] == [MiB, 0]
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == new_version


@pytest.mark.parametrize("wrong", [1, 2], ids=["once", "again"])
async def test_a_wrong_hash_earns_one_fresh_download_then_a_verification_error(tmp_path, write_config, wrong):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": 256 * KiB}})
    server.file("tensor01", "a.pkl").wrong_hashes = wrong
    report = await _sync(tmp_path, write_config, server)
    cluster = report.clusters["tensor01"]
    assert server.offsets("tensor01", "a.pkl") == [0, 0]  # the partial was discarded; one fresh download, no more
    if wrong == 1:
        assert report.ok and cluster.verified_by == {"sha256"}
        assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")
    else:
        [failure] = cluster.failures
        assert isinstance(failure, VerificationError) and "a.pkl" in str(failure)
        assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()


async def test_without_a_shell_files_are_verified_by_size(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": 256 * KiB}})
    server.clusters["tensor01"].shell = False
    server.file("tensor01", "a.pkl").wrong_hashes = 5  # never asked: there is no sha256sum to ask
    report = await _sync(tmp_path, write_config, server)
    assert report.ok and report.clusters["tensor01"].verified_by == {"size"}
    assert server.offsets("tensor01", "a.pkl") == [0]


async def test_a_stall_is_given_up_after_the_timeout_and_becomes_a_reconnect(tmp_path, write_config):
    timeout = 0.3
    server = _serve(tmp_path, {"tensor01": {"a.pkl": MiB, "b.pkl": MiB}})
    server.file("tensor01", "a.pkl").stall_at = 400_000
    started = time.monotonic()
    report = await _sync(tmp_path, write_config, server, timeout=timeout, max_parallel=2)
    took = time.monotonic() - started
    cluster = report.clusters["tensor01"]
    assert report.ok, cluster.errors
    assert cluster.reconnects == 1 and server.offsets("tensor01", "a.pkl") == [0, 400_000]
    assert timeout <= took < timeout + 5, took
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")


@pytest.mark.parametrize("refusals", [1, 99], ids=["refused-once", "refused-always"])
async def test_connects_refused_after_a_drop_are_retried_then_the_link_is_given_up(
        tmp_path, write_config, refusals):
    retries = 2
    server = _serve(tmp_path, {"tensor01": {"a.pkl": MiB}})
    server.file("tensor01", "a.pkl").drop_at = [300_000]
    server.clusters["tensor01"].refused = set(range(1, 1 + refusals))  # the first connect is answered
    report = await _sync(tmp_path, write_config, server, retries=retries)
    cluster = report.clusters["tensor01"]
    if refusals == 1:
        assert report.ok and cluster.reconnects == 2 and server.offsets("tensor01", "a.pkl") == [0, 300_000]
        return
    assert server.connects["tensor01"] == 1 + 1 + retries  # the first, then once and up to --retries more
    [failure] = cluster.failures
    assert isinstance(failure, LinkLostError)
    assert (failure.drops, failure.attempts) == (1, retries + 1)
    assert failure.last_cause == "connection refused: nothing listens on memory:22"
    assert "Kept, verified: 293.0 KiB of a.pkl" in str(failure), str(failure)
    assert DownloadLayout(tmp_path / "dl").load_state("tensor01", "a.pkl").verified_offset == 300_000


async def test_slots_are_shared_fairly_between_many_small_files_and_few_large_ones(tmp_path, write_config):
    # "busy" lists first (clusters sync in the configuration's order): its 40
    # files ask for slots before "large" has listed its 2.
    server = _serve(tmp_path, {"busy": {f"s{i:02d}.npy": 16 * KiB for i in range(40)},
                               "large": {"big0.pkl": 2 * MiB, "big1.pkl": 2 * MiB}})
    # The large files come over a slow link (32 chunks, 5 ms each), so that
    # they are in flight together for a while however busy the machine is.
    server.clusters["large"].chunk_delay = 0.005
    assert list(server.entries()) == ["busy", "large"]
    report = await _sync(tmp_path, write_config, server, max_parallel=4)
    assert report.ok, {c: r.errors for c, r in report.clusters.items()}
    assert server.most_reads_in_flight == 4
    # "large" had both its files in flight while "busy" had most of its own
    # still to fetch (a first-come queue would have served busy's 40 first),
    # and "busy" went on meanwhile, within its share. (Once one of the large
    # files is done, "large" needs one slot and "busy" may take three.)
    large = [index for index, read in enumerate(server.reads) if read.cluster == "large"]
    assert [read.cluster for read in server.reads[:max(large)]].count("busy") <= 10, server.reads
    both_large = [read for read in server.reads if read.in_flight.get("large") == 2]
    assert any(read.cluster == "busy" for read in both_large), server.reads
    assert max(read.in_flight.get("busy", 0) for read in both_large) == 2, server.reads
    for cluster in ("busy", "large"):
        assert_mirrored(tmp_path / "srv" / cluster, tmp_path / "dl" / cluster)


async def test_nothing_beyond_max_parallel_files_is_in_flight_even_across_a_reconnect(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {f"part{i:02d}.pkl": 128 * KiB for i in range(12)}})
    server.file("tensor01", "part03.pkl").drop_at = [64 * KiB]
    server.clusters["tensor01"].chunk_delay = 0.005  # reads overlap in time however busy the machine is
    report = await _sync(tmp_path, write_config, server, max_parallel=3)
    assert report.ok and report.clusters["tensor01"].reconnects == 1
    assert server.most_reads_in_flight == 3
    assert_mirrored(tmp_path / "srv" / "tensor01", tmp_path / "dl" / "tensor01")


async def test_up_to_date_files_are_not_read_again(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": 64 * KiB, "b.pkl": 64 * KiB}})
    await _sync(tmp_path, write_config, server)
    served = len(server.reads)
    server.file("tensor01", "b.pkl").mtime += 1  # touched on the cluster
    report = await _sync(tmp_path, write_config, server)
    assert report.ok and report.clusters["tensor01"].skipped == 1
    assert [read.name for read in server.reads[served:]] == ["b.pkl"]


async def test_the_hash_of_every_file_to_fetch_is_asked_for_as_the_listing_names_it(tmp_path, write_config):
    server = _serve(tmp_path, {"tensor01": {"a.pkl": 64 * KiB, "b.pkl": 64 * KiB, "c.pkl": 64 * KiB}})
    await _sync(tmp_path, write_config, server)
    assert sorted(server.prefetched) == [("tensor01", n) for n in ("a.pkl", "b.pkl", "c.pkl")]
    server.file("tensor01", "b.pkl").mtime += 1
    server.prefetched.clear()
    report = await _sync(tmp_path, write_config, server)
    assert report.ok and server.prefetched == [("tensor01", "b.pkl")]  # not the up-to-date ones
