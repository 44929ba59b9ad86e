"""One run at a time for every command that reads the download directory: a merge (`merge`,
`run --merge-only`, the API's) started while a sync of the same folder runs is refused as a second
sync is, naming the sync; `status` reads without the lock and says what is in flight."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time

import anyio
import pytest
from reliability_helpers import sync_argv, wait_until

from async_embed_sync import load
from async_embed_sync.api import merge
from async_embed_sync.cli import main
from async_embed_sync.errors import DownloadDirLockedError
from async_embed_sync.testing.synthetic import generate_run

pytestmark = pytest.mark.anyio

ROWS = 2010  # 768 float32 a row: two files of about 3 MiB, so that a stall after 2 MiB is mid-file


async def test_a_merge_while_a_sync_runs_is_refused_naming_the_sync_and_status_labels_it(
        tmp_path, embedded_server, link_proxy, write_config, capsys):
    generate_run(tmp_path / "srv" / "ckpt", rows=ROWS, clusters=("tensor01",), gpus_per_cluster=2)
    download_dir, output = tmp_path / "dl", tmp_path / "merged.pkl"
    (tmp_path / "direct").mkdir()
    async with embedded_server(tmp_path / "srv") as server, \
            link_proxy(server, stall_after=2 * 1024 * 1024) as proxy:
        direct = write_config(tmp_path / "direct", {"tensor01": server.cluster_entry("/ckpt/tensor01")})
        stalled = write_config(tmp_path, {"tensor01": server.cluster_entry("/ckpt/tensor01", port=proxy.port)})
        # A first sync completes; then the GPUs write a new version of every file.
        assert await anyio.to_thread.run_sync(main, sync_argv(direct, download_dir)) == 0
        generate_run(tmp_path / "srv" / "ckpt", rows=ROWS, clusters=("tensor01",), gpus_per_cluster=2, seed=1)
        for path in (tmp_path / "srv" / "ckpt" / "tensor01").iterdir():
            half_an_hour_ago = time.time() - 1800
            os.utime(path, (half_an_hour_ago, half_an_hour_ago))
        capsys.readouterr()

        sync = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "async_embed_sync", *sync_argv(stalled, download_dir, "--timeout", "60"),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: proxy.stalled or sync.returncode is not None, what="the stall")
            assert proxy.stalled  # the sync holds the folder, mid-file, the old version still in place
            holder = f"is in use by another run (pid {sync.pid} on {socket.gethostname()}, a sync started "
            for argv in (["merge", "--download-dir", str(download_dir), "--output", str(output)],
                         ["run", "--merge-only", "--download-dir", str(download_dir), "--output", str(output)]):
                code = await anyio.to_thread.run_sync(main, argv)
                err = capsys.readouterr().err
                assert code == 1, err
                assert err.startswith(f"error: The download directory {download_dir} {holder}"), err
                assert "no checkpoints" not in err and "cannot be read" not in err and "Traceback" not in err
            with pytest.raises(DownloadDirLockedError, match=holder.replace("(", r"\(")):
                await anyio.to_thread.run_sync(lambda: merge(download_dir, output))
            assert not output.exists()

            # status reads without the lock, and labels what is in flight, above the table.
            code = await anyio.to_thread.run_sync(
                main, ["status", "--config", str(direct), "--download-dir", str(download_dir)])
            out, err = capsys.readouterr()
            assert code == 0, err
            first, header, row = out.splitlines()[:3]
            assert first == (f"A sync is running here (pid {sync.pid} on {socket.gethostname()}, started "
                             f"{time.strftime('%H:%M', time.localtime(_started(download_dir)))}): partial "
                             f"counts are moving."), out
            assert header.startswith("cluster ") and row.startswith("tensor01 ")
            code = await anyio.to_thread.run_sync(
                main, ["status", "--json", "--config", str(direct), "--download-dir", str(download_dir)])
            document = json.loads(capsys.readouterr().out)
            assert code == 0
            assert document["in_flight"]["pid"] == sync.pid and document["in_flight"]["command"] == "sync"
        finally:
            proxy.resume()
            stderr = (await asyncio.wait_for(sync.communicate(), 60))[1].decode()
        assert sync.returncode == 0, stderr

        # The sync done, the merge takes the new version whole, and status says nothing is in flight.
        assert await anyio.to_thread.run_sync(
            main, ["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]) == 0
        code = await anyio.to_thread.run_sync(
            main, ["status", "--config", str(direct), "--download-dir", str(download_dir)])
        assert code == 0 and capsys.readouterr().out.startswith("cluster ")
    result = load(output)
    assert result["total_articles"] == ROWS - 10
    assert {c["sha256"] for c in result["chunk_info"]} == {
        _sha256(p) for p in (tmp_path / "srv" / "ckpt" / "tensor01").iterdir()}


def _started(download_dir) -> float:
    return json.loads((download_dir / ".async_embed_sync" / "owner").read_text())["since"]


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
