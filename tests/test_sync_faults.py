"""The sync under injected faults: asyncssh's own server with fault-injecting
``SFTPServer`` subclasses, and a proxy that cuts or stalls the link after a
given number of bytes (deterministic triggers, no sleeps)."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import anyio
import asyncssh
import pytest
from reliability_helpers import (
    FAST_RETRY,
    assert_mirrored,
    cli_child_command,
    ignores_sigint,
    make_files,
    sync_argv,
    sync_in_process,
    wait_until,
    with_sigint,
)

from async_embed_sync.cli import main
from async_embed_sync.config import load_config
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.progress import PlainProgress, format_bytes
from async_embed_sync.transfer.download import CHECKPOINT_BYTES
from async_embed_sync.transfer.remote import READ_AHEAD_BYTES
from async_embed_sync.transfer.sync import SyncOptions, sync_clusters

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


async def _cli_sync_child(config: Path, download_dir: Path, stderr, sigint_ignored: bool = False,
                          prelude: str = ""):
    """The real CLI in a process of its own, to be killed or signalled."""
    command = cli_child_command(sync_argv(config, download_dir), prelude)
    return await asyncio.create_subprocess_exec(
        *with_sigint(command, ignored=sigint_ignored),
        stdout=asyncio.subprocess.DEVNULL, stderr=stderr)


async def _until_stalled(proxy, child=None) -> None:
    """Wait (bounded) until the proxy's stall point is reached."""
    for _ in range(600):
        if proxy.stalled or (child is not None and child.returncode is not None):
            break
        await asyncio.sleep(0.05)
    assert proxy.stalled, "the transfer never reached the stall point"


async def _cut_once_written(proxy, partials: list[Path]) -> None:
    """At the stall point, once some of what arrived is on disk, cut the link,
    and cut it again 3,000 bytes into every reconnect.

    Cut at the byte count alone, a loaded client may not have read what the
    proxy delivered before the cut, and then nothing was there to keep."""
    await _until_stalled(proxy)
    for _ in range(600):
        if any(part.exists() and part.stat().st_size for part in partials):
            break
        await asyncio.sleep(0.05)
    proxy.set_cut_after([proxy.bytes_to_client + 3000 * i for i in range(1, 200)])
    proxy.cut_now()
    proxy.resume()


async def _interrupted_when_stalled(proxy, run) -> None:
    """Run ``run`` and cancel it (as Ctrl-C would) once the link stalls."""
    task = asyncio.create_task(run)
    await _until_stalled(proxy)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proxy.resume()


async def test_drops_mid_file_resume_from_the_verified_offset(tmp_path, embedded_server, link_proxy,
                                                              write_config):
    size = 48 * MiB
    remote = make_files(tmp_path / "srv" / "ckpt", {"big.pkl": size})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, cut_after=[14 * MiB, 33 * MiB]) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        report = await sync_in_process(config, tmp_path / "dl", max_parallel=1)
    assert report.ok, report.clusters["tensor01"].errors
    assert proxy.cuts == 2 and report.clusters["tensor01"].reconnects == 2
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["big.pkl"])
    # A restart from 0 would have cost 14 + 33 MiB more; resuming costs at
    # most the read-ahead lost in flight at each drop (plus SSH framing).
    resent = proxy.bytes_to_client - size
    assert resent < 2 * (READ_AHEAD_BYTES + MiB), resent


async def test_a_drop_is_said_once_per_cluster_not_per_file_in_flight(tmp_path, embedded_server, link_proxy,
                                                                      write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {f"part{i}.pkl": 6 * MiB for i in range(4)})
    lines = io.StringIO()
    async with embedded_server(tmp_path / "srv") as server, link_proxy(server, cut_after=9 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        report = await sync_clusters(load_config(config).select(None), str(tmp_path / "dl"),
                                     PlainProgress(lines, interval=3600),
                                     SyncOptions(**{**FAST_RETRY, "max_parallel": 4}))
    assert report.ok and proxy.cuts == 1
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", [f"part{i}.pkl" for i in range(4)])
    text = lines.getvalue()
    assert text.count("tensor01: connection lost; reconnecting.") == 1, text
    assert text.count("tensor01: reconnected; the files in flight resume at their verified offsets.") == 1, text
    assert "(retrying)" not in text and "failed" not in text, text


@pytest.mark.parametrize(("retries", "files"), [(0, 1), (2, 1), (2, 3)],
                         ids=["retries-0", "retries-2", "retries-2-three-files-in-flight"])
async def test_a_link_that_drops_on_every_reconnect_is_said_to_be_the_link_not_the_host(
        tmp_path, embedded_server, link_proxy, write_config, capsys, retries, files):
    """Connected, 2 MiB arrived, then the link is cut, and cut again within
    every reconnect's handshake: the host was reached, so the paragraph and
    the closing line say the link dropped (not "check the host name and
    port"), a rerun resumes, and the fetched column counts what was kept.
    With several files in flight the link is given up once, for all."""
    size = 8 * MiB
    names = ["big.npy"] if files == 1 else [f"part{i}.npy" for i in range(files)]
    remote = make_files(tmp_path / "srv" / "ckpt", dict.fromkeys(names, size))
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=2 * MiB) as proxy, anyio.create_task_group() as group:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        sync = anyio.to_thread.run_sync(main, [
            "sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
            "--retries", str(retries), "--timeout", "5"])
        partials = [DownloadLayout(tmp_path / "dl").partial_path("tensor01", name) for name in names]
        group.start_soon(_cut_once_written, proxy, partials)
        code = await sync
        err = capsys.readouterr().err
        assert code == 1, err
        assert proxy.cuts == 2 + retries, err  # the drop, then each reconnect: no file reconnects again
        layout = DownloadLayout(tmp_path / "dl")
        kept = {name: state.verified_offset for name in names
                if (state := layout.load_state("tensor01", name)) is not None and state.verified_offset}
        assert kept and all(0 < offset < size for offset in kept.values()), kept
        assert "Traceback" not in err and "Errno" not in err, err
        assert "host name and port in the configuration" not in err and "cannot be reached" not in err, err
        assert "Broken pipe" not in err and "Connection reset by peer" not in err, err  # plain words only
        attempts = "the attempt to reconnect" if retries == 0 else f"{retries + 1} attempts in a row to reconnect"
        [paragraph] = [line for line in err.splitlines() if line.startswith("Cluster 'tensor01':")]
        assert paragraph.startswith(f"Cluster 'tensor01': the connection to 127.0.0.1:{proxy.port} was lost, "
                                    f"and {attempts} failed (the last: "), paragraph
        assert "It had connected earlier in this run, so the host name, port and login are right" in paragraph
        what = f"of {next(iter(kept))}" if len(kept) == 1 else f"of {len(kept)} files in progress"
        assert f"Kept, verified: {format_bytes(sum(kept.values()))} {what}; run the same command again" \
               in paragraph, paragraph
        # Said once, and each retry with its count: --retries N is N more after the first reconnect.
        assert err.count("tensor01: connection lost; reconnecting.") == 1, err
        for retry in range(1, retries + 1):
            assert err.count(f"; retry {retry} of {retries} in ") == 1, err
        assert f"retry {retries + 1} " not in err, err
        row = next(line for line in err.splitlines() if line.startswith("tensor01 "))
        # fetched: received and kept this run
        assert row.split()[4:6] == format_bytes(sum(kept.values())).split(), row
        closing = err.strip().splitlines()[-1]
        assert closing.startswith("error: The sync did not finish. tensor01: the connection dropped and "
                                  "reconnecting failed ("), closing
        assert closing.count("(a rerun resumes)") == 1, closing
        assert closing.endswith("What was verified is kept: running the same command again resumes where it "
                                "stopped."), closing  # bytes were kept: they are said to be
        # And so it does, fetching only the rest.
        direct = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(direct, tmp_path / "dl")
    assert report.ok and report.transferred == files * size - sum(kept.values())
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", names)


async def test_killed_process_resumes(tmp_path, embedded_server, link_proxy, write_config):
    size = 40 * MiB
    remote = make_files(tmp_path / "srv" / "ckpt", {"big.pkl": size})
    kill_at = 25 * MiB
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=kill_at) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        child = await _cli_sync_child(config, tmp_path / "dl", stderr=asyncio.subprocess.DEVNULL)
        await _until_stalled(proxy, child)
        child.send_signal(signal.SIGKILL)
        await child.wait()
        proxy.resume()
        before = proxy.bytes_to_client
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok
    assert report.clusters["tensor01"].resumed == 1
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["big.pkl"])
    # Only what the killed run had not yet made durable (at most one
    # checkpoint interval, plus what was in flight) comes again.
    assert proxy.bytes_to_client - before < size - kill_at + CHECKPOINT_BYTES + READ_AHEAD_BYTES


async def test_corrupted_partial_is_detected_and_healed(tmp_path, embedded_server, link_proxy,
                                                        write_config):
    size = 24 * MiB
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": size})
    layout = DownloadLayout(tmp_path / "dl")
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=18 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        await _interrupted_when_stalled(proxy, sync_in_process(config, tmp_path / "dl"))
        state = layout.load_state("tensor01", "a.pkl")
        assert state.verified_offset >= 8 * MiB and not state.complete
        # Flip one byte inside the verified prefix, as a disk error would.
        with open(layout.partial_path("tensor01", "a.pkl"), "r+b") as partial:
            partial.seek(5 * MiB)
            byte = partial.read(1)
            partial.seek(5 * MiB)
            partial.write(bytes([byte[0] ^ 0xFF]))
        healed = await sync_in_process(config, tmp_path / "dl")
    assert healed.ok
    assert healed.clusters["tensor01"].resumed == 0  # the damaged prefix was not trusted
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl"])


async def test_interrupted_run_resumes_where_it_stopped(tmp_path, embedded_server, link_proxy,
                                                        write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 24 * MiB})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=18 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        await _interrupted_when_stalled(proxy, sync_in_process(config, tmp_path / "dl"))
        verified = DownloadLayout(tmp_path / "dl").load_state("tensor01", "a.pkl").verified_offset
        second = await sync_in_process(config, tmp_path / "dl")
    assert second.ok and second.clusters["tensor01"].resumed == 1
    assert second.transferred == 24 * MiB - verified
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl"])


class FailOnceAtOffset(asyncssh.SFTPServer):
    """Fails the first read that covers ``FAIL_AT``, as a flaky filesystem would."""

    FAIL_AT = 3 * MiB
    failed = False

    def read(self, file_obj, offset, size):
        if not FailOnceAtOffset.failed and offset <= self.FAIL_AT < offset + size:
            FailOnceAtOffset.failed = True
            raise asyncssh.SFTPFailure("injected I/O error")
        return super().read(file_obj, offset, size)


async def test_server_read_failure_is_retried(tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 8 * MiB, "b.npy": 2 * MiB})
    async with embedded_server(tmp_path / "srv", sftp_factory=FailOnceAtOffset) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    assert FailOnceAtOffset.failed
    assert report.ok
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl", "b.npy"])


class ConnectionLostOnce(asyncssh.SFTPServer):
    """Answers one read with "connection lost", as a file still holding the old
    connection after a reconnect is answered."""

    lost = False

    def read(self, file_obj, offset, size):
        if not ConnectionLostOnce.lost and offset >= 1 * MiB:
            ConnectionLostOnce.lost = True
            raise asyncssh.SFTPConnectionLost("Connection not open")
        return super().read(file_obj, offset, size)


async def test_a_lost_connection_under_one_file_is_retried_without_a_per_file_line(
        tmp_path, embedded_server, write_config):
    """A drop is the link's to say, once; a file's late "connection lost" is part of it, not a failure."""
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 4 * MiB})
    lines = io.StringIO()
    async with embedded_server(tmp_path / "srv", sftp_factory=ConnectionLostOnce) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_clusters(load_config(config).select(None), str(tmp_path / "dl"),
                                     PlainProgress(lines, interval=3600), SyncOptions(**FAST_RETRY))
    assert ConnectionLostOnce.lost and report.ok
    assert "(retrying)" not in lines.getvalue() and "failed" not in lines.getvalue(), lines.getvalue()
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl"])


async def test_without_a_shell_files_are_verified_by_size(tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 3 * MiB})
    async with embedded_server(tmp_path / "srv", allow_exec=False) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok and report.clusters["tensor01"].verified_by == {"size"}
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl"])


async def test_with_a_shell_files_are_verified_by_sha256(tmp_path, embedded_server, write_config):
    make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 1 * MiB})
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.clusters["tensor01"].verified_by == {"sha256"}
    assert any("sha256sum" in (command or "") for command in server.exec_commands)


@pytest.mark.parametrize(("files", "max_parallel", "most_calls"), [(12, 12, 11), (40, 1, 4)],
                         ids=["all-in-flight", "one-in-flight"])
async def test_remote_hashes_are_asked_for_at_the_listing_in_batches_and_every_file_verified(
        tmp_path, embedded_server, write_config, files, max_parallel, most_calls):
    """Several files per sha256sum call, each file hashed once; with one file
    in flight at a time the hashes still come in a few batches: each is
    queued as the listing names the file, not when its transfer starts."""
    names = {f"part{i:02d}.pkl": 50_000 + i for i in range(files)}
    remote = make_files(tmp_path / "srv" / "ckpt", names)
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl", max_parallel=max_parallel)
    assert report.ok and report.clusters["tensor01"].verified_by == {"sha256"}
    hashes = [c for c in server.exec_commands if c and c.startswith("sha256sum")]
    assert sum(c.count(".pkl") for c in hashes) == files  # each file hashed once
    assert len(hashes) <= most_calls, hashes
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", names)


async def test_wrong_host_key_refused_before_any_file_is_written(tmp_path, embedded_server,
                                                                 write_config):
    make_files(tmp_path / "srv" / "ckpt", {"a.pkl": MiB})
    impostor = tmp_path / "known_hosts_impostor"
    async with embedded_server(tmp_path / "srv") as server:
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        impostor.write_text(f"[127.0.0.1]:{server.port} {other}")
        config = write_config(tmp_path, {"tensor01": server.cluster_entry(
            "/ckpt", known_hosts=str(impostor))})
        report = await sync_in_process(config, tmp_path / "dl")
    assert not report.ok
    assert "does not match" in report.clusters["tensor01"].errors[0]
    assert not (tmp_path / "dl" / "tensor01").exists()
    assert not DownloadLayout(tmp_path / "dl").partial_path("tensor01", "a.pkl").exists()


HOSTILE_NAMES = [b"../escape.pkl", b"/abs.pkl", b"sub/dir.pkl", b"back\\slash.pkl", b"nul\x00.pkl",
                 b"x" * 300 + b".pkl"]


class HostileListing(asyncssh.SFTPServer):
    """Lists names that try to escape the download directory."""

    async def scandir(self, path):
        async for entry in super().scandir(path):
            yield entry
        attrs = asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_REGULAR, size=10, mtime=1)
        for name in HOSTILE_NAMES:
            yield asyncssh.SFTPName(name, name, attrs)


async def test_hostile_remote_names_are_refused(tmp_path, embedded_server, write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"good.pkl": MiB})
    async with embedded_server(tmp_path / "srv", sftp_factory=HostileListing) as server:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(config, tmp_path / "dl")
    errors = report.clusters["tensor01"].errors
    assert len(errors) == len(HOSTILE_NAMES) and all("refused" in e for e in errors)
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["good.pkl"])
    written = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert not {"escape.pkl", "abs.pkl", "dir.pkl"} & written


async def test_stalled_link_is_noticed_and_the_sync_finishes(tmp_path, embedded_server, link_proxy,
                                                             write_config):
    remote = make_files(tmp_path / "srv" / "ckpt", {"a.pkl": 12 * MiB})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=5 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})

        async def resume_when_the_client_reconnects():
            first = None
            for _ in range(400):
                if proxy.stalled and first is None:
                    first = proxy.connections
                if first is not None and proxy.connections > first:
                    proxy.resume()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(resume_when_the_client_reconnects())
        report = await asyncio.wait_for(sync_in_process(config, tmp_path / "dl", timeout=2.0), 30)
        await watcher
    assert report.ok and report.clusters["tensor01"].reconnects >= 1
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["a.pkl"])


@pytest.mark.parametrize(("stop", "sigint_ignored", "code", "line"), [
    (signal.SIGTERM, False, 143, "Terminated."),
    # As a non-interactive script's `cmd &` starts it: SIGTERM still stops it.
    (signal.SIGTERM, True, 143, "Terminated."),
    (signal.SIGINT, False, 130, "Interrupted."),  # Ctrl-C
], ids=["sigterm", "sigterm-with-sigint-ignored", "ctrl-c"])
async def test_sigterm_or_ctrl_c_stops_the_sync_and_keeps_what_arrived(
        tmp_path, embedded_server, link_proxy, write_config, stop, sigint_ignored, code, line):
    remote = make_files(tmp_path / "srv" / "ckpt", {"big.pkl": 24 * MiB})
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=13 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        child = await _cli_sync_child(config, tmp_path / "dl", stderr=asyncio.subprocess.PIPE,
                                      sigint_ignored=sigint_ignored)
        await _until_stalled(proxy, child)
        assert ignores_sigint(child.pid) == sigint_ignored
        child.send_signal(stop)
        stderr = (await asyncio.wait_for(child.communicate(), 30))[1].decode()
        assert child.returncode == code, stderr
        assert stderr.startswith(line) and stderr.count("\n") == 1, stderr  # one line, no traceback
        # What arrived in order before the signal was kept, and vouched for.
        state = DownloadLayout(tmp_path / "dl").load_state("tensor01", "big.pkl")
        kept = state.verified_offset if state is not None else 0
        assert kept > 0, "nothing was kept"
        proxy.resume()
        report = await sync_in_process(config, tmp_path / "dl")
    assert report.ok and report.clusters["tensor01"].resumed == 1
    assert report.transferred == 24 * MiB - kept  # only the rest came again
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", ["big.pkl"])


# A disk slower than the link: 50 ms a block (256 KiB, one pwrite), 5 MiB/s
# per file. The read-ahead then fills and every block is already there when
# the download asks for it, as when a fast link outruns the disk or the CPU.
# The OS is slowed, not our code: the child's pwrite sleeps first.
_SLOW_DISK = """
import os, time
_pwrite = os.pwrite
def _slow_pwrite(fd, data, offset):
    time.sleep(0.05)
    return _pwrite(fd, data, offset)
os.pwrite = _slow_pwrite
"""


@pytest.mark.parametrize(("bottleneck", "stop", "sigint_ignored", "code", "line"), [
    ("link", signal.SIGINT, False, 130, "Interrupted."),  # Ctrl-C
    ("link", signal.SIGTERM, True, 143, "Terminated."),  # `kill` of a script's `cmd &`
    ("disk", signal.SIGINT, False, 130, "Interrupted."),
], ids=["slow-link-ctrl-c", "slow-link-sigterm-with-sigint-ignored", "slow-disk-ctrl-c"])
async def test_a_stop_ends_the_transfers_in_flight_within_half_a_second(
        tmp_path, embedded_server, link_proxy, write_config, bottleneck, stop, sigint_ignored, code, line):
    """Ctrl-C or SIGTERM with several files in flight: the transfers stop at
    once (no read-ahead awaited, no file fetched to its end first), what was
    verified is kept, one line is said, and the rerun completes the files."""
    names = [f"part{i}.pkl" for i in range(4)]
    size = 12 * MiB if bottleneck == "disk" else 4 * MiB
    rate = 48 * MiB if bottleneck == "disk" else 8 * MiB  # bytes/s, shared by the files
    # Signalled once the read-ahead of every file is (nearly) there, or after ~0.5 s of a slow link.
    signal_at = 28 * MiB if bottleneck == "disk" else 4 * MiB
    remote = make_files(tmp_path / "srv" / "ckpt", dict.fromkeys(names, size))
    async with embedded_server(tmp_path / "srv") as server, link_proxy(server, rate=rate) as proxy:
        config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
        child = await _cli_sync_child(config, tmp_path / "dl", stderr=asyncio.subprocess.PIPE,
                                      sigint_ignored=sigint_ignored,
                                      prelude=_SLOW_DISK if bottleneck == "disk" else "")
        for _ in range(600):
            if proxy.bytes_to_client >= signal_at or child.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert proxy.bytes_to_client >= signal_at, "the transfer never got going"
        child.send_signal(stop)
        at_signal, signalled = proxy.bytes_to_client, asyncio.get_running_loop().time()
        stderr = (await asyncio.wait_for(child.communicate(), 30))[1].decode()
        stopped_after = asyncio.get_running_loop().time() - signalled
        # The proxy counts a chunk as delivered once written to the client's
        # socket: until it notices the client gone, a queued chunk may still
        # be counted. A process left receiving would keep the connection open.
        await wait_until(lambda: proxy.open_connections == 0, timeout=5,
                         what="the proxy to see the exited client's connection close")
        at_exit = proxy.bytes_to_client
        await asyncio.sleep(0.2)
        assert proxy.bytes_to_client == at_exit, "bytes still flow to a process that has exited"
        assert child.returncode == code, stderr
        assert stderr.startswith(line) and stderr.count("\n") == 1, stderr  # no per-file 'failed', no traceback
        # Generous for a loaded CI machine; the stop itself takes ~0.1 s.
        assert stopped_after < 1.5, f"the process exited {stopped_after:.2f} s after the signal"
        assert at_exit - at_signal < rate * 0.5, \
            f"{(at_exit - at_signal) / MiB:.1f} MiB arrived after the signal"
        layout = DownloadLayout(tmp_path / "dl")
        kept = sum(state.verified_offset for state in map(lambda n: layout.load_state("tensor01", n), names)
                   if state is not None)
        assert 0 < kept < len(names) * size
        # The rerun, straight to the server (no rate limit), fetches only the rest.
        direct = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(direct, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    assert report.transferred == len(names) * size - kept
    assert_mirrored(remote, tmp_path / "dl" / "tensor01", names)
