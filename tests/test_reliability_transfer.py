"""The transfer under faults triggered by byte counts: repeated drops across
files in flight, a misbehaving server (short reads, files that shrink or grow
mid-copy), a symlink planted at the partial path, and a second run on a busy
download directory."""

from __future__ import annotations

import asyncio
import os
import random
import sys
from collections import Counter
from pathlib import Path

import anyio
import asyncssh
import pytest
from reliability_helpers import (
    MiB,
    assert_mirrored,
    assert_no_wrong_file_in_place,
    make_files,
    sync_argv,
    sync_in_process,
    wait_until,
)

from async_embed_sync.cli import main
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.testing.synthetic import finish_writing
from async_embed_sync.transfer.remote import MAX_BLOCK_SIZE

pytestmark = pytest.mark.anyio

CLUSTERS = ("tensor01", "tensor02")
# The read-ahead is lowered for the drop test, so that the bound it checks
# is tight against files of a few MiB (four blocks: the pipelined read's minimum).
SMALL_READ_WINDOW = 4 * MAX_BLOCK_SIZE
# What SSH adds to the payload: per connection the handshake, channel and
# SFTP setup, listing and sha256sum replies; per byte the packet and SFTP
# framing (well under 1 %).
SSH_BYTES_PER_CONNECTION = 64 * 1024
SSH_FRAMING_SHARE = 0.02


@pytest.mark.parametrize("seed", [11, 29])
async def test_drops_at_random_offsets_across_concurrent_files_resend_at_most_the_reads_in_flight(
        tmp_path, embedded_server, link_proxy, write_config, seed):
    """Each link is cut at four seeded random byte counts while several files
    are in flight on it; every file ends byte-identical.

    The bound on what is sent again: at a cut, the bytes of a file that
    arrived but are lost are those of its read requests still outstanding
    (past the contiguous prefix already written, which the drop's checkpoint
    keeps). A file read keeps at most the read window outstanding per
    file. So per link, what was delivered beyond the files' sizes is at most
    cuts x (most files in flight at once on that link) x window, plus SSH's
    own bytes (handshake per connection, framing per byte). A restart from 0
    would cost each file in flight everything it had.
    """
    counting_server, most_in_flight = _counting_files_in_flight()
    rng = random.Random(seed)
    remotes, cuts = {}, {}
    for cluster in CLUSTERS:
        sizes = {f"emb_gpu{gpu}.pkl": rng.randrange(4 * MiB, 7 * MiB) for gpu in range(4)}
        remotes[cluster] = make_files(tmp_path / "srv" / cluster, sizes, seed=rng.random())
        total = sum(sizes.values())
        # At least 1 MiB apart, so that every connection gains some bytes.
        whole_mib = sorted(rng.sample(range(1, total // MiB - 1), 4))
        cuts[cluster] = [m * MiB + rng.randrange(MiB // 2) for m in whole_mib]

    async with embedded_server(tmp_path / "srv", sftp_factory=counting_server) as server, \
            link_proxy(server, cut_after=cuts["tensor01"]) as proxy1, \
            link_proxy(server, cut_after=cuts["tensor02"]) as proxy2:
        proxies = dict(zip(CLUSTERS, (proxy1, proxy2)))
        config = write_config(tmp_path, {c: server.cluster_entry(f"/{c}", port=proxies[c].port)
                                         for c in CLUSTERS})
        report = await asyncio.wait_for(sync_in_process(config, tmp_path / "dl", max_parallel=4,
                                                        read_ahead=SMALL_READ_WINDOW), 120)

    assert report.ok, {c: r.errors for c, r in report.clusters.items()}
    for cluster in CLUSTERS:
        proxy = proxies[cluster]
        assert proxy.cuts == 4 and report.clusters[cluster].reconnects >= 4
        assert most_in_flight[cluster] >= 2, "the drops must hit several files in flight"
        assert_mirrored(remotes[cluster], tmp_path / "dl" / cluster)
        size = sum(p.stat().st_size for p in remotes[cluster].iterdir())
        resent = proxy.bytes_to_client - size
        bound = (proxy.cuts * most_in_flight[cluster] * SMALL_READ_WINDOW
                 + proxy.connections * SSH_BYTES_PER_CONNECTION + SSH_FRAMING_SHARE * size)
        assert resent <= bound, (cluster, resent, bound)


def _counting_files_in_flight():
    """An SFTP server class, and the most files it had open at once on one
    connection, per cluster folder: the files in flight on that link, as the
    server saw them."""
    open_now, most = Counter(), Counter()
    opened = {}

    class CountingServer(asyncssh.SFTPServer):
        def open(self, path, pflags, attrs):
            file_obj = super().open(path, pflags, attrs)
            key = opened[file_obj] = (self.connection, Path(os.fsdecode(file_obj.name)).parent.name)
            open_now[key] += 1
            most[key[1]] = max(most[key[1]], open_now[key])
            return file_obj

        def close(self, file_obj):
            open_now[opened.pop(file_obj)] -= 1
            return super().close(file_obj)

    return CountingServer, most


def _fault_server(on_read):
    """An SFTP server class whose reads go through ``on_read(server, file_obj, offset, size)``."""

    class FaultyServer(asyncssh.SFTPServer):
        def read(self, file_obj, offset, size):
            return on_read(super(), file_obj, offset, size)

    return FaultyServer


async def test_short_reads_still_give_identical_files(tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 5 * MiB + 3, "b.npy": 700_001})
    short_reads = 0

    def half_of_every_read(server, file_obj, offset, size):
        nonlocal short_reads
        data = server.read(file_obj, offset, size)
        if len(data) > 1:
            short_reads += 1
            return data[: len(data) // 2]
        return data

    async with embedded_server(tmp_path / "srv", sftp_factory=_fault_server(half_of_every_read)) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    assert short_reads > 20
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")


def _change_at(path: Path, offset: int, change, times: int | None = 1):
    """A read hook on ``path``: at the first read at or past ``offset`` of
    each copy (``times`` copies at most; None: every copy), ``change(path)``.
    Returns the hook and the list of copies started (reads at offset 0)."""
    copies: list[int] = []
    changed_in: set[int] = set()

    def on_read(server, file_obj, read_offset, size):
        if Path(os.fsdecode(file_obj.name)) == path:
            if read_offset == 0:
                copies.append(len(copies))
            copy = len(copies)
            if read_offset >= offset and copy not in changed_in and (times is None or len(changed_in) < times):
                changed_in.add(copy)
                change(path)
        return server.read(file_obj, read_offset, size)

    return on_read, copies


async def test_a_file_that_shrinks_mid_copy_ends_as_its_final_content(tmp_path, embedded_server,
                                                                     write_config):
    """Truncated on the server when the copy reaches its middle: the reads
    past the new end come back empty, the copy is recognised as short, and
    the file stays a partial, still being written; once its job is done the
    next sync takes it at its final size. (A file that grows mid-copy: see
    test_a_change_mid_copy_is_noticed below.)"""
    size = 6 * MiB
    shrunk_size = size * 6 // 10
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": size, "b.npy": MiB})

    def shrink(path):
        with path.open("r+b") as f:
            f.truncate(shrunk_size)

    on_read, copies = _change_at(remote / "a.pkl", size // 2, shrink)
    async with embedded_server(tmp_path / "srv", sftp_factory=_fault_server(on_read)) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
        assert report.still_writing == {"tensor01": ["a.pkl"]}, report.clusters["tensor01"].errors
        assert "a.pkl is still being written (it ended at 3.6 MiB while it was copied, not at the 6.0 MiB listed)" \
            in str(report.clusters["tensor01"].still_writing[0])
        assert len(copies) == 1, "not copied again in the same run"
        assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()
        finish_writing(remote, ago=1800)
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").stat().st_size == shrunk_size


async def test_a_symlink_planted_at_the_partial_path_is_refused_and_its_target_untouched(
        tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 2 * MiB, "b.npy": MiB})
    outside = tmp_path / "outside" / "precious.txt"
    outside.parent.mkdir()
    outside.write_bytes(b"must not change")
    before = outside.stat()
    layout = DownloadLayout(tmp_path / "dl")
    layout.prepare("tensor01")
    layout.partial_path("tensor01", "a.pkl").symlink_to(outside)

    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")

    errors = report.clusters["tensor01"].errors
    assert len(errors) == 1 and "Cannot write" in errors[0], errors
    assert str(layout.partial_path("tensor01", "a.pkl")) in errors[0]
    assert outside.read_bytes() == b"must not change"
    assert outside.stat().st_mtime_ns == before.st_mtime_ns and outside.stat().st_size == before.st_size
    assert list(outside.parent.iterdir()) == [outside]
    assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()
    # The other file is not held back by the refused one.
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["b.npy"])
    assert_no_wrong_file_in_place(remote, tmp_path / "dl" / "tensor01")


async def test_a_second_run_on_a_busy_download_directory_refuses_naming_the_holder(
        tmp_path, embedded_server, link_proxy, write_config, capsys):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 6 * MiB})
    download_dir = tmp_path / "dl"
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=2 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        argv = sync_argv(config, download_dir, "--timeout", "60")
        first = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "async_embed_sync", *argv,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            # The first run holds the directory and is mid-file when the link stalls.
            await wait_until(lambda: proxy.stalled or first.returncode is not None, what="the stall")
            assert proxy.stalled
            # main() in a worker thread: the test's loop must keep the proxy running.
            second = await anyio.to_thread.run_sync(main, argv)
            message = capsys.readouterr().err
            assert second == 1
            assert f"is in use by another run (pid {first.pid} on " in message, message
            assert "Traceback" not in message
            # The refused run wrote nothing: the first run's partial is intact.
            assert not (download_dir / "tensor01" / "a.pkl").exists()
        finally:
            proxy.resume()
            stderr = (await asyncio.wait_for(first.communicate(), 60))[1].decode()
    assert first.returncode == 0, stderr
    assert_mirrored(remote, download_dir / "tensor01")



async def test_a_stalled_link_is_noticed_within_the_timeout_and_the_sync_finishes(
        tmp_path, embedded_server, link_proxy, write_config):
    """The proxy stops forwarding after 3 MiB with every socket open; the
    client must give the link up and connect again within about ``timeout``
    (keepalives every timeout / 4), then finish the file."""
    timeout = 1.5
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 8 * MiB})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=3 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        run = asyncio.create_task(sync_in_process(config, tmp_path / "dl", timeout=timeout))
        await wait_until(lambda: proxy.stalled, what="the stall")
        stalled_at = asyncio.get_running_loop().time()
        await wait_until(lambda: proxy.connections > 1, timeout=10 * timeout, what="a reconnect")
        noticed_after = asyncio.get_running_loop().time() - stalled_at
        proxy.resume()  # the new connection's bytes must flow
        report = await asyncio.wait_for(run, 30)
    assert noticed_after <= 2 * timeout + 0.5, noticed_after
    assert report.ok and report.clusters["tensor01"].reconnects == 1
    assert report.clusters["tensor01"].resumed == 1
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")


@pytest.mark.parametrize("damage", [b"", b'{"version": 1, "remote_size"', b"\x00" * 64, b'{"version": 1}'],
                         ids=["empty", "torn", "zeros", "fields-missing"])
async def test_a_damaged_journal_is_recovered_from_end_to_end(tmp_path, embedded_server, write_config,
                                                              damage):
    """A partial whose state file is damaged is not trusted (its bytes are
    wrong here, on purpose) and not crashed on: the file is fetched again."""
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 3 * MiB})
    layout = DownloadLayout(tmp_path / "dl")
    layout.prepare("tensor01")
    layout.partial_path("tensor01", "a.pkl").write_bytes(b"\xff" * (2 * MiB))
    layout.state_path("tensor01", "a.pkl").write_bytes(damage)
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok and report.clusters["tensor01"].resumed == 0
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")
    assert layout.load_state("tensor01", "a.pkl").complete


async def test_a_file_that_changes_during_every_copy_is_copied_once_and_named(
        tmp_path, embedded_server, write_config):
    """A checkpoint still being written (it grows during each copy) is copied
    once per run, not chased: it stays a partial, is named in one line, and
    nothing is put in its place; the other files complete."""
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 3 * MiB, "b.npy": MiB})
    copies = 0

    class GrowsAtEveryClosingStat(asyncssh.SFTPServer):
        def fstat(self, file_obj):
            nonlocal copies
            if os.fsdecode(file_obj.name).endswith("a.pkl"):
                copies += 1
                with (remote / "a.pkl").open("ab") as f:
                    f.write(b"x" * 4096)
            return super().fstat(file_obj)

    async with embedded_server(tmp_path / "srv", sftp_factory=GrowsAtEveryClosingStat) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await asyncio.wait_for(sync_in_process(config, tmp_path / "dl", retries=2), 30)
    cluster = report.clusters["tensor01"]
    assert not cluster.failures and [str(e) for e in cluster.still_writing] == [
        "Cluster 'tensor01': a.pkl is still being written (it grew from 3,145,728 to 3,149,824 bytes while it was copied): "
        "3.0 MiB of it is kept as a partial, and nothing was put in its place. Run again once its job has "
        "finished writing it, or add --follow to wait for it."]
    assert copies == 1
    assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()
    assert DownloadLayout(tmp_path / "dl").load_state("tensor01", "a.pkl").verified_offset == 3 * MiB
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["b.npy"])


@pytest.mark.parametrize("shell", [False, True], ids=["no-shell", "shell"])
@pytest.mark.parametrize("change", ["rewritten", "grows"])
async def test_a_change_mid_copy_is_noticed(tmp_path, embedded_server, write_config, change, shell):
    """The closing stat must describe the file *after* the reads: without a
    shell (no sha256sum) it is the only check of a change mid-copy, and with
    one, the remote sha256 may have been computed before the change. The
    embedded asyncssh server answers requests concurrently, so a stat sent
    behind the last read could be answered before it."""
    size = 6 * MiB
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": size})

    def rewrite(path):
        before = path.stat()
        with path.open("r+b") as f:
            f.write(random.Random(3).randbytes(size))
        os.utime(path, (before.st_atime, before.st_mtime + 10))

    def grow(path):
        with path.open("ab") as f:
            f.write(random.Random(4).randbytes(MiB))

    on_read, copies = _change_at(remote / "a.pkl", size // 2, rewrite if change == "rewritten" else grow)
    async with embedded_server(tmp_path / "srv", sftp_factory=_fault_server(on_read),
                               allow_exec=shell) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
        assert report.still_writing == {"tensor01": ["a.pkl"]}, report.clusters["tensor01"].errors
        assert not (tmp_path / "dl" / "tensor01" / "a.pkl").exists()
        finish_writing(remote, ago=1800)  # its job is done, with the last write it made
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    # The partial resumes where the file grew; a rewritten prefix, or one no
    # server hash can vouch for, is fetched again whole.
    assert len(copies) == (1 if change == "grows" and shell else 2)
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")
