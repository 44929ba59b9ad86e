"""``--follow``: the sync runs beside the GPU jobs; files appear in stages, one grows over
several polls, one GPU's piece is re-split mid-run; the result is a merge of the final files."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import anyio
import numpy as np
import pytest

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.testing.synthetic import finish_writing, generate_run

pytestmark = pytest.mark.anyio

ROWS = 400  # 2 clusters x 2 GPUs; 10 questions at the end


def _final_files(tmp_path: Path) -> Path:
    """The run as it ends: tensor02's GPU 1 wrote its piece as two files (a re-split)."""
    final = tmp_path / "final"
    generate_run(final, rows=ROWS, dim=8, gpus_per_cluster=2)
    resplit = tmp_path / "resplit"
    generate_run(resplit, rows=ROWS, dim=8, gpus_per_cluster=2, files_per_gpu=2)
    for old in (final / "tensor02").glob("embeddings_gpu1_*"):
        old.unlink()
    for new in (resplit / "tensor02").glob("embeddings_gpu1_*"):
        shutil.copy(new, final / "tensor02" / new.name)
    return final


class Stages:
    """The cluster's directory as the jobs leave it, one stage per poll the tool reports."""

    def __init__(self, final: Path, remote: Path):
        self.final, self.remote = final, remote
        self.gpu0 = sorted((final / "tensor02").glob("embeddings_gpu0_*.pkl"))[0]
        self.steps = [self.half_written, self.written_on, self.finished, self.one_piece_then_resplit,
                      self.resplit_done]
        self.done = 0

    def _put(self, source: Path, data: bytes | None = None, finished: bool = True) -> None:
        target = self.remote / source.parent.name / source.name
        target.write_bytes(source.read_bytes() if data is None else data)
        if finished:  # written an hour ago, a second apart per stage: each version has an mtime of its own
            written = time.time() - 3600 + self.done
            os.utime(target, (written, written))

    def start(self) -> None:
        (self.remote / "tensor01").mkdir(parents=True)
        (self.remote / "tensor02").mkdir(parents=True)
        for path in (self.final / "tensor01").iterdir():
            self._put(path)

    def next(self) -> bool:
        if self.done == len(self.steps):
            return False
        self.steps[self.done]()
        self.done += 1
        return True

    def half_written(self) -> None:
        data = self.gpu0.read_bytes()
        self._put(self.gpu0, data[: len(data) // 2], finished=False)

    def written_on(self) -> None:
        data = self.gpu0.read_bytes()
        self._put(self.gpu0, data[: len(data) * 3 // 4], finished=False)

    def finished(self) -> None:
        self._put(self.gpu0)

    def one_piece_then_resplit(self) -> None:
        # GPU 1's job first writes the first half of its piece, in one file ...
        earlier = self.final.parent / "earlier"
        generate_run(earlier, rows=ROWS, dim=8, gpus_per_cluster=2, files_per_gpu=3, seed=7)
        self._put(sorted((earlier / "tensor02").glob("embeddings_gpu1_*.pkl"))[0])

    def resplit_done(self) -> None:
        # ... then it is re-run, and writes its piece as two other files.
        for old in (self.remote / "tensor02").glob("embeddings_gpu1_*"):
            old.unlink()
        for path in (self.final / "tensor02").glob("embeddings_gpu1_*"):
            self._put(path)


def _with_total(config: Path, complete_when: str) -> Path:
    if complete_when == "total_rows":
        document = json.loads(config.read_text())
        config.write_text(json.dumps({**document, "total_rows": ROWS}))
    return config


async def _follow(argv: list[str], stages: Stages) -> tuple[int, str]:
    """The CLI in a process of its own, the jobs moving on a stage every 0.7 s from its
    first "waiting:" line (the settle window, 5 s, spans every stage that writes in place)."""
    lines = []
    async with await anyio.open_process([sys.executable, "-m", "async_embed_sync", *argv]) as process:
        waiting = anyio.Event()

        async def read() -> None:
            buffered = b""
            async for chunk in process.stderr:
                buffered += chunk
                *complete, buffered = buffered.split(b"\n")
                lines.extend(line.decode() for line in complete)
                if any("waiting: " in line for line in lines):
                    waiting.set()
            if buffered:
                lines.append(buffered.decode())

        async def jobs() -> None:
            await waiting.wait()
            while stages.next():
                await anyio.sleep(0.7)

        with anyio.fail_after(90):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(read)
                tasks.start_soon(jobs)
                code = await process.wait()
    return code, "\n".join(lines)


@pytest.mark.parametrize(("server", "complete_when"), [("embedded", "total_rows"), ("openssh", "quiet")])
async def test_follow_waits_for_staged_growing_and_resplit_files_then_merges_the_final_set(
        tmp_path, server, complete_when, embedded_server, openssh, write_config):
    """The set is complete at ``total_rows`` (in the config), or, with no total known,
    once nothing changed for --quiet-period."""
    final = _final_files(tmp_path)
    remote = tmp_path / "srv" / "ckpt"
    stages = Stages(final, remote)
    stages.start()
    argv_tail = ["--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "merged.pkl"),
                 "--follow", "--poll", "0.2", "--settle", "5", "--max-wait", "80", "--quiet-period", "3"]
    if server == "openssh":
        entries = {name: openssh.cluster_entry(str(remote / name)) for name in ("tensor01", "tensor02")}
        config = _with_total(write_config(tmp_path, entries), complete_when)
        code, err = await _follow(["run", "--config", str(config), *argv_tail], stages)
    else:
        async with embedded_server(tmp_path / "srv") as embedded:
            entries = {name: embedded.cluster_entry(f"/ckpt/{name}") for name in ("tensor01", "tensor02")}
            config = _with_total(write_config(tmp_path, entries), complete_when)
            code, err = await _follow(["run", "--config", str(config), *argv_tail], stages)
    assert code == 0, err
    assert stages.done == len(stages.steps), err
    # Said while it waited: per cluster, and the set.
    assert "tensor02: 0 file(s) here, 0 still being written, 0 rows" in err
    assert f"{stages.gpu0.name} is still being written (" in err
    assert "tensor02: 0 file(s) here, 1 still being written, 0 rows, last change seen at " in err
    if complete_when == "total_rows":
        assert "waiting: 200 of 400 rows here, rows 200..399 missing. Looking again every 0 s (--poll)" in err
    else:
        assert "waiting: 400 rows here; complete once nothing changes for 3 s (--quiet-period)" in err
    assert "Traceback" not in err

    merged = load(tmp_path / "merged.pkl")
    reference = tmp_path / "reference.pkl"
    assert main(["merge", "--download-dir", str(final), "--output", str(reference), "--quiet"]) == 0
    expected = load(reference)
    np.testing.assert_array_equal(merged["embeddings"], expected["embeddings"])
    assert merged["articles"] == expected["articles"]


def test_follow_ends_at_once_on_a_failure_no_poll_can_mend(tmp_path, openssh, write_config, capsys):
    remote = tmp_path / "remote"
    generate_run(remote, rows=ROWS, dim=8, gpus_per_cluster=2)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01")),
                                     "tensor02": openssh.cluster_entry(str(remote / "no-such-folder"))})
    started = time.monotonic()
    code = main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--follow",
                 "--poll", "0.2", "--max-wait", "30"])
    err = capsys.readouterr().err
    assert code == 1 and time.monotonic() - started < 15, err
    assert "tensor02: remote_dir cannot be listed (fix this first: a rerun alone will not)" in err
    assert "waiting:" not in err  # not polled again: a missing folder does not appear by waiting


def test_sync_follow_ends_once_the_set_is_complete_and_merges_nothing(tmp_path, openssh, write_config, capsys):
    remote = tmp_path / "remote"
    generate_run(remote, rows=ROWS, dim=8, gpus_per_cluster=2, declare_total=True)
    config = write_config(tmp_path, {name: openssh.cluster_entry(str(remote / name))
                                     for name in ("tensor01", "tensor02")})
    assert main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--follow",
                 "--poll", "0.2", "--max-wait", "30"]) == 0
    err = capsys.readouterr().err
    assert "waiting:" not in err and "Merged" not in err  # complete at the first look: total_rows in the checkpoints
    assert len(list((tmp_path / "dl").glob("*/*.pkl"))) == 4
