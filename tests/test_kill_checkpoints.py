"""What a kill costs: a partial's verified length is recorded every 2 s as well as
every 8 MiB, so a SIGKILL loses at most about two seconds of each file in flight,
however small the files."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from reliability_helpers import MiB, assert_mirrored, cli_child_command, make_files, sync_argv, sync_in_process

from async_embed_sync.layout import DownloadLayout
from async_embed_sync.transfer.download import CHECKPOINT_BYTES, CHECKPOINT_SECONDS

pytestmark = pytest.mark.anyio

NAMES = ("a.pkl", "b.pkl", "c.npy")
RATE = MiB  # bytes per second through the proxy, shared by the files


async def test_a_kill_mid_transfer_keeps_all_but_the_last_seconds_of_small_files(
        tmp_path, embedded_server, link_proxy, write_config):
    size = 7 * MiB
    assert size < CHECKPOINT_BYTES
    remote = make_files(tmp_path / "srv" / "ckpt", {name: size for name in NAMES})
    layout = DownloadLayout(tmp_path / "dl")
    partials = [layout.partial_path("tensor01", name) for name in NAMES]

    def written() -> list[int]:
        return [path.stat().st_size if path.exists() else 0 for path in partials]

    async with embedded_server(tmp_path / "srv") as server:
        async with link_proxy(server, rate=RATE) as proxy:
            config = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt", port=proxy.port)})
            child = await asyncio.create_subprocess_exec(
                *cli_child_command(sync_argv(config, tmp_path / "dl")),
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            deadline = time.monotonic() + 60
            # Under way: the server may serve one file's read-ahead before the others' reads.
            while max(written()) < 256 * 1024 and child.returncode is None:
                assert time.monotonic() < deadline, f"the transfer never got going: {written()}"
                await asyncio.sleep(0.05)
            await asyncio.sleep(CHECKPOINT_SECONDS + 0.5)  # a checkpoint interval later
            on_disk = written()
            assert child.returncode is None, (await child.stderr.read()).decode()
            child.send_signal(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL
        states = {name: layout.load_state("tensor01", name) for name in NAMES}
        verified = {name: state.verified_offset if state else 0 for name, state in states.items()}
        # Every file smaller than CHECKPOINT_BYTES that was under way for a checkpoint interval
        # keeps what it had verified (the server may have served one before the others).
        under_way = [name for name, size_here in zip(NAMES, on_disk) if size_here >= 256 * 1024]
        assert under_way and all(states[name] is not None and states[name].verified_offset > 0
                                 for name in under_way), (verified, on_disk)
        left = {name for name, state in states.items() if state is None or not state.complete}
        assert left, "every file was complete before the kill: nothing to resume"
        # What the kill cost: about CHECKPOINT_SECONDS of the link's bytes at most (a second's slack).
        assert sum(on_disk) - sum(verified.values()) < (CHECKPOINT_SECONDS + 1) * RATE, (on_disk, verified)
        direct = write_config(tmp_path / "srv", {"tensor01": server.cluster_entry("/ckpt")})
        report = await sync_in_process(direct, tmp_path / "dl")
    assert report.ok, report.clusters["tensor01"].errors
    assert report.clusters["tensor01"].resumed == len([name for name in left if verified[name]])
    assert report.transferred == sum(size - verified[name] for name in left)
    assert_mirrored(remote, tmp_path / "dl" / "tensor01")
