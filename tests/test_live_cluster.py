"""A cluster whose jobs are still at work while a run copies from it.

A checkpoint still being written (it grows while it is copied), a set of
checkpoints rewritten mid-run (in place or by rename, mid-copy or after the
copies), a rewrite in the same second at the same size, and a GPU's file
re-split into two mid-run. Whatever the timing, a run never ends 0 with a
mix of versions: it either names the files still being written and exits 1
(`run` then merges nothing), or, once nothing changes any more, its result
is the merge of the files as the cluster finally holds them.

The triggers are byte offsets read by the server (a read hook) or the
cluster's n-th listing, never wall-clock sleeps; only the writer of a
growing file is paced in time, as a job's flushes are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import asyncssh
import numpy as np
import pytest
from terminal import Terminal

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.progress import format_bytes
from async_embed_sync.testing.netproxy import run_in_thread
from async_embed_sync.testing.synthetic import (
    finish_writing,
    generate_run,
    make_rows,
    make_vectors,
    write_legacy_checkpoint,
)

MiB = 1024 * 1024
KiB = 1024
CLUSTER = "tensor01"
STILL_WRITTEN_TAIL = (": {kept} of it is kept as a partial, and nothing was put in its place. Run again once "
                      "its job has finished writing it, or add --follow to wait for it.")
SETTLE_WHY = re.compile(r"last modified \d+ s before it was listed, within the settle window of 60 s \(--settle\)")
WHY = r"\((?:[^()]|\([^()]*\))+\)"  # "(why)", which may hold "(--settle)"
GREW_WHY = re.compile(r"it grew from .+ to .+ while it was copied")


# ------------------------------------------------------------------ helpers


class SlowWriter(threading.Thread):
    """A job writing ``final`` to ``path``: the file holds ``final[:start]`` now, and the
    rest is appended in ``chunk`` pieces at ``rate`` bytes a second, each flushed, as a
    job's buffered writes reach the file system."""

    def __init__(self, path: Path, final: bytes, start: int, rate: float, chunk: int = 32 * KiB):
        super().__init__(daemon=True, name=f"writer of {path.name}")
        self.path, self.final, self.start_at, self.rate, self.chunk = path, final, start, rate, chunk
        self.error: BaseException | None = None
        path.write_bytes(final[:start])  # written a moment ago: its mtime is now

    def run(self) -> None:
        try:
            position, due = self.start_at, time.monotonic()
            with open(self.path, "ab") as stream:
                while position < len(self.final):
                    piece = self.final[position:position + self.chunk]
                    stream.write(piece)
                    stream.flush()
                    position += len(piece)
                    due += len(piece) / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
        except BaseException as exc:  # noqa: BLE001 - reported by wait_finished
            self.error = exc

    def wait_finished(self, timeout: float = 30.0) -> None:
        """The job is done: every byte written."""
        self.join(timeout)
        assert not self.is_alive(), f"{self.path.name} was still being written after {timeout} s"
        assert self.error is None, self.error
        assert self.path.read_bytes() == self.final


def _written_ago(path: Path, seconds: float) -> None:
    """Date one file's last write ``seconds`` ago (``finish_writing`` does a whole folder)."""
    when = time.time() - seconds
    os.utime(path, (when, when))


async def _main(argv: list[str]) -> int:
    """``main(argv)`` in a worker thread: the test's loop keeps the server and the proxy running."""
    return await anyio.to_thread.run_sync(main, argv)


def _run_argv(config: Path, tmp_path: Path, *extra: str, command: str = "run") -> list[str]:
    argv = [command, "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--timeout", "10"]
    if command == "run":
        argv += ["--output", str(tmp_path / "merged.pkl")]
    return argv + list(extra)


def _merge_of(folders: dict[str, Path], where: Path) -> dict:
    """The merge of the files as the clusters hold them (copied here as by hand), loaded."""
    reference = where / "reference"
    for cluster, folder in folders.items():
        shutil.copytree(folder, reference / cluster, ignore=shutil.ignore_patterns(".*"))
    output = where / "reference.pkl"
    assert main(["merge", "--download-dir", str(reference), "--output", str(output), "--quiet"]) == 0
    return load(output)


def _assert_same_result(result: dict, reference: dict,
                        what: str = "the merge of the files as the cluster holds them") -> None:
    got, want = np.asarray(result["embeddings"]), np.asarray(reference["embeddings"])
    assert got.shape == want.shape, f"{got.shape[0]:,} rows merged, {want.shape[0]:,} in {what}"
    differ = np.flatnonzero((got != want).any(axis=1))
    assert not differ.size, (f"{differ.size:,} of {got.shape[0]:,} merged rows (from row {differ[0]:,} to "
                             f"{differ[-1]:,}) are not those of {what}")
    assert result["articles"] == reference["articles"], f"the articles are not those of {what}"
    assert result["total_articles"] == reference["total_articles"]


def _still_written_lines(err: str) -> dict[str, list[str]]:
    """The "is still being written" lines, by file name."""
    lines: dict[str, list[str]] = {}
    for line in err.splitlines():
        found = re.match(rf"Cluster '{CLUSTER}': (\S+) is still being written \(", line)
        if found:
            lines.setdefault(found.group(1), []).append(line)
    return lines


def _named_once(err: str) -> list[str]:
    """The files said to be still being written, each in one line only, sorted."""
    lines = _still_written_lines(err)
    assert all(len(said) == 1 for said in lines.values()), err
    return sorted(lines)


def _closing_line(err: str) -> str:
    return err.strip().splitlines()[-1]


def _assert_closing_line_names(err: str, names: list[str]) -> None:
    closing = _closing_line(err)
    assert closing.startswith(f"error: The sync did not finish. {CLUSTER}: still being written there: "), closing
    listed = closing.split("still being written there: ", 1)[1].split(" (run again once", 1)[0]
    assert sorted(listed.split(", ")) == sorted(names), closing
    assert "(run again once their jobs have written them, or add --follow to wait for them)" in closing, closing


def _server_changing(*, at_read: tuple[Path, int] | None = None, at_listing: int | None = None,
                     change: Callable[[], None]) -> tuple[type, list[str]]:
    """An SFTP server class that calls ``change()`` once: at the first read at or past
    ``offset`` of ``path`` (``at_read``), or when the cluster is listed for the
    ``at_listing``-th time, before it answers. Returns it and a list that records
    when it fired."""
    fired: list[str] = []
    listings = 0

    class ChangingServer(asyncssh.SFTPServer):
        def read(self, file_obj, offset, size):
            if at_read is not None and not fired and offset >= at_read[1] \
                    and Path(os.fsdecode(file_obj.name)) == at_read[0]:
                fired.append(f"read of {at_read[0].name} at {offset:,}")
                change()
            return super().read(file_obj, offset, size)

        async def scandir(self, path):
            nonlocal listings
            listings += 1
            if at_listing is not None and listings == at_listing and not fired:
                fired.append(f"listing {listings}")
                change()
            async for entry in super().scandir(path):
                yield entry

    return ChangingServer, fired


# ------------------------------------------------- 1: a checkpoint still growing


def _small_growing_run(root: Path) -> Path:
    """gpu0 and gpu1 as .npy + .json + .jsonl; gpu1's articles (.jsonl, 2 MiB) are the file still growing."""
    paths = generate_run(root, rows=2000, dim=64, clusters=(CLUSTER,), gpus_per_cluster=2, fmt="npy",
                         text_bytes=2000, questions=0)
    return paths[1].with_suffix(".jsonl")


def _large_growing_run(root: Path) -> Path:
    """gpu0 a small .pkl; gpu1 a 12 MiB .pkl (3,840 rows of 768 float32 and their articles), still being dumped."""
    folder = root / CLUSTER
    pieces = [(0, 256), (256, 4096)]
    written = []
    for gpu, (start, end) in enumerate(pieces):
        written.append(write_legacy_checkpoint(
            folder / f"embeddings_gpu{gpu}_{start:08d}_{end:08d}.pkl", make_vectors(start, end, dim=768, seed=0),
            make_rows(start, end, text_bytes=200, question_indices=(), seed=0), start_index=start, gpu_id=gpu,
            hostname=f"{CLUSTER}-node"))
    finish_writing(root)
    return written[1]


# (builder, bytes already written when the run starts, link rate)
GROWING = {
    "small-jsonl": (_small_growing_run, 64 * KiB, 2 * MiB),
    "large-pkl": (_large_growing_run, 9 * MiB, 4 * MiB),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(GROWING))
async def test_a_checkpoint_still_growing_stops_the_run_and_the_next_run_merges_its_final_content(
        tmp_path, embedded_server, link_proxy, write_config, capsys, case):
    """Without a terminal (plain lines). A file appended at 1 MiB/s while a slow link
    copies the run: one line says it is still being written, the closing line names it,
    exit 1, nothing merged, its bytes kept as a partial; the other files are in place.
    Once its job has finished, the next run resumes it and merges the final files."""
    build, start, rate = GROWING[case]
    growing = build(tmp_path / "srv")
    remote = growing.parent
    final = growing.read_bytes()
    layout = DownloadLayout(tmp_path / "dl")
    async with embedded_server(tmp_path / "srv") as server, link_proxy(server, rate=rate) as proxy:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry(f"/{CLUSTER}", port=proxy.port)})
        writer = SlowWriter(growing, final, start, rate=1 * MiB)  # after cluster_entry, which dates the rest
        writer.start()
        try:
            code = await _main(_run_argv(config, tmp_path))
        finally:
            writer.wait_finished()
        err = capsys.readouterr().err
        assert code == 1, err
        assert "Traceback" not in err and "TypeError" not in err, err

        # One line for the growing file, none for the others.
        lines = _still_written_lines(err)
        assert list(lines) == [growing.name] and len(lines[growing.name]) == 1, err
        state = layout.load_state(CLUSTER, growing.name)
        assert state is not None and not state.complete and state.verified_offset >= start, state
        line = lines[growing.name][0]
        why = line.split(" is still being written (", 1)[1].rsplit("): ", 1)[0]
        assert GREW_WHY.fullmatch(why) or SETTLE_WHY.fullmatch(why), line
        assert line.endswith(STILL_WRITTEN_TAIL.format(kept=format_bytes(state.verified_offset))), line
        _assert_closing_line_names(err, [growing.name])
        assert not re.search(r"merge: ", err), err  # `run` did not go on to merge

        # Nothing merged, nothing in its place, its bytes kept; the finished files are here.
        assert not (tmp_path / "merged.pkl").exists()
        assert not layout.final_path(CLUSTER, growing.name).exists()
        partial = layout.partial_path(CLUSTER, growing.name).read_bytes()
        kept = state.verified_offset
        assert len(partial) >= kept and partial[:kept] == final[:kept]
        for other in remote.iterdir():
            if other != growing:
                assert layout.final_path(CLUSTER, other.name).read_bytes() == other.read_bytes(), other.name

        # Its job is done (the other files untouched): the next run takes the final
        # file, resuming the partial, and fetches nothing else.
        _written_ago(growing, 1800)
        before = proxy.bytes_to_client
        code = await _main(_run_argv(config, tmp_path, "--quiet"))
        err = capsys.readouterr().err
        assert code == 0, err
        fetched_again = proxy.bytes_to_client - before
    assert layout.final_path(CLUSTER, growing.name).read_bytes() == final
    assert fetched_again < len(final) - state.verified_offset + 512 * KiB, (fetched_again, state.verified_offset)
    _assert_same_result(load(tmp_path / "merged.pkl"), _merge_of({CLUSTER: remote}, tmp_path))


def test_the_flag_the_still_being_written_lines_advise_is_one_the_commands_take(capsys):
    """Both lines say "add --follow to wait for it": `sync` and `run` must accept it."""
    for command in ("sync", "run"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert "--follow" in out, f"`{command} --help` has no --follow:\n{out}"


# ------------------------------------------- 2: the same, at a terminal


def _screen(terminal: Terminal, columns: int, lines: int) -> list[str]:
    import pyte

    screen = pyte.Screen(columns, lines)
    pyte.ByteStream(screen).feed(terminal.screen)
    return screen.display


def _assert_shown_on_rows_of_its_own(rows: list[str], columns: int, pattern: str) -> None:
    """A line matching ``pattern`` is on the screen from the start of a row, wrapped onto
    the next rows if long, and nothing else is on its last row: not glued to a bar, and
    no bar's remnant after it."""
    screen = "".join(row.ljust(columns)[:columns] for row in rows)  # a long line runs on into the next row
    found = re.search(pattern, screen)
    assert found, "\n".join(rows)
    assert found.start() % columns == 0, "\n".join(rows)  # not after a bar on its first row
    row_end = -(-found.end() // columns) * columns
    assert not screen[found.end():row_end].strip(), "\n".join(rows)  # nothing after it on its last row


@pytest.mark.parametrize("case", list(GROWING))
def test_a_checkpoint_still_growing_at_a_terminal_keeps_its_bars_within_100_percent(
        openssh, tmp_path, write_config, case):
    """The growing file at a pseudo-terminal (tqdm bars), against the real sshd through a
    slow link: no bar ever shows more than 100 % or more MiB than its total, nothing
    crashes, exit 1, nothing merged. Then, its job done, the same command at the terminal
    merges (exit 0), bars still within 100 %. Last, what the first run's screen showed
    at its end: the line for the file and the closing line, each on rows of its own."""
    build, start, rate = GROWING[case]
    columns, rows = 80, 60
    growing = build(tmp_path / "remote")
    final = growing.read_bytes()
    with run_in_thread(openssh.host, openssh.port, rate=rate) as proxy:
        config = write_config(tmp_path, {CLUSTER: openssh.cluster_entry(str(growing.parent), port=proxy.port)})
        command = [sys.executable, "-m", "async_embed_sync", *_run_argv(config, tmp_path)]
        writer = SlowWriter(growing, final, start, rate=1 * MiB)
        writer.start()
        try:
            with Terminal(command, columns=columns, lines=rows) as terminal:
                code = terminal.wait(timeout=60)
        finally:
            writer.wait_finished()
        assert code == 1, terminal.text()
        _assert_bars_within_100_percent(terminal)
        shown = _screen(terminal, columns, rows)
        state = DownloadLayout(tmp_path / "dl").load_state(CLUSTER, growing.name)
        assert state is not None and not state.complete and state.verified_offset >= start
        tail = STILL_WRITTEN_TAIL.format(kept=format_bytes(state.verified_offset))
        assert not (tmp_path / "merged.pkl").exists()

        finish_writing(growing.parent, ago=1800)
        with Terminal(command, columns=columns, lines=rows) as terminal:
            code = terminal.wait(timeout=60)
        assert code == 0, terminal.text()
        _assert_bars_within_100_percent(terminal)
    _assert_same_result(load(tmp_path / "merged.pkl"), _merge_of({CLUSTER: growing.parent}, tmp_path))
    _assert_shown_on_rows_of_its_own(shown, columns, rf"Cluster '{CLUSTER}': {re.escape(growing.name)} is "
                                                     rf"still being written {WHY}{re.escape(tail)}")
    _assert_shown_on_rows_of_its_own(shown, columns, re.escape(
        f"error: The sync did not finish. {CLUSTER}: still being written there: {growing.name} (run again "
        f"once their jobs have written them, or add --follow to wait for them). What was verified is kept: "
        f"running the same command again resumes where it stopped."))


def _assert_bars_within_100_percent(terminal: Terminal) -> None:
    text = terminal.text()
    assert "Traceback" not in text and "TypeError" not in text and "NoneType" not in text, text
    drawn = terminal.rows_drawn()
    percents = [int(p) for row in drawn for p in re.findall(r"(\d+)%\|", row)]
    assert percents, drawn  # bars were drawn
    assert max(percents) <= 100, [row for row in drawn if re.search(r"(\d{4,}|[2-9]\d\d|1\d[1-9]|110)%\|", row)]
    amounts = [(float(n), float(total), row) for row in drawn
               for n, total in re.findall(r"\| (\d+\.\d)/(\d+\.\d) MiB \[", row)]
    assert amounts and all(n <= total for n, total, _ in amounts), [row for n, total, row in amounts if n > total]


# ---------------------------------------- 3: a set rewritten during the run

ROWS = 3000


def _rewrite(remote: Path, new: Path, how: str) -> Callable[[], None]:
    """A job re-run rewriting every file of ``remote`` with its namesake in ``new``:
    in place (same size, new bytes), or written beside it and renamed over it."""

    def rewrite() -> None:
        for source in sorted(new.iterdir()):
            target = remote / source.name
            data = source.read_bytes()
            if how == "in-place":
                with open(target, "r+b") as stream:
                    stream.write(data)
                    stream.truncate()
            else:
                temporary = remote / f".{source.name}.tmp"
                temporary.write_bytes(data)
                os.replace(temporary, target)

    return rewrite


def _a_set_and_its_rerun(tmp_path: Path, root: Path) -> tuple[Path, Path, list[str], Path, dict]:
    """Three GPUs' checkpoints (.pkl, .npy + .json + .jsonl, .pkl) under ``root/tensor01``, and
    a re-run's (other values, the same names and sizes) beside them. Returns the cluster's
    folder, the re-run's, the names, the .npy, and the merge of the re-run's files."""
    remote = root / CLUSTER
    old_paths = generate_run(root, rows=ROWS, dim=256, clusters=(CLUSTER,), gpus_per_cluster=3, fmt="mixed", seed=0)
    generate_run(tmp_path / "rerun", rows=ROWS, dim=256, clusters=(CLUSTER,), gpus_per_cluster=3, fmt="mixed", seed=1)
    new = tmp_path / "rerun" / CLUSTER
    names = sorted(p.name for p in remote.iterdir())
    assert [p.suffix for p in old_paths] == [".pkl", ".npy", ".pkl"] and len(names) == 5
    assert names == sorted(p.name for p in new.iterdir())
    assert all((remote / n).stat().st_size == (new / n).stat().st_size for n in names)  # same sizes
    old_result = _merge_of({CLUSTER: remote}, tmp_path / "old")
    new_result = _merge_of({CLUSTER: new}, tmp_path / "new")
    assert not np.array_equal(old_result["embeddings"], new_result["embeddings"])
    return remote, new, names, old_paths[1].resolve(), new_result


@pytest.mark.anyio
@pytest.mark.parametrize("settle", ["default", "0"])
@pytest.mark.parametrize("how", ["in-place", "rename"])
@pytest.mark.parametrize("when", ["mid-copy", "after-the-copies"])
async def test_a_set_rewritten_during_a_run_never_merges_as_a_mix_of_versions(
        tmp_path, embedded_server, link_proxy, write_config, capsys, when, how, settle):
    """Three GPUs' checkpoints (.pkl, .npy + .json + .jsonl, .pkl) are all rewritten by a
    re-run of the job (other values, same sizes): when the server has read half of the
    .npy (``mid-copy``), or at the cluster's second listing, once every file was copied
    (``after-the-copies``). The run never exits 0 with a mix: under the default settle
    window every file has a fresh mtime and is named as still being written (exit 1,
    nothing merged, and `merge` alone refuses what is here); with --settle 0 a rewrite
    after the copies is fetched again and the result is all of the new version, and a
    rewrite mid-copy either ends the same way or is named. Once the re-run is done, the
    next run's result is the merge of the new files."""
    remote, new, names, npy, new_result = _a_set_and_its_rerun(tmp_path, tmp_path / "srv")
    change = _rewrite(remote, new, how)
    server_class, fired = (_server_changing(at_read=(npy, npy.stat().st_size // 2), change=change)
                           if when == "mid-copy" else _server_changing(at_listing=2, change=change))
    extra = [] if settle == "default" else ["--settle", "0"]
    output = tmp_path / "merged.pkl"

    async with embedded_server(tmp_path / "srv", sftp_factory=server_class) as server, \
            link_proxy(server, rate=4 * MiB) as proxy:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry(f"/{CLUSTER}", port=proxy.port)})
        code = await _main(_run_argv(config, tmp_path, *extra))
        err = capsys.readouterr().err
        assert fired, "the rewrite never happened"
        assert "Traceback" not in err, err
        named = _named_once(err)
        if settle == "default":
            # Every file has a fresh mtime now: none can be taken yet.
            assert code == 1, err
            assert named == names, err
            _assert_closing_line_names(err, names)
        elif when == "after-the-copies":
            assert code == 0, err
        if code == 0:
            assert not named, err
            _assert_same_result(load(output), new_result)
        else:
            assert code == 1 and named and set(named) <= set(names), err
            _assert_closing_line_names(err, named)
            assert not output.exists()
            # What is here is no one version of the run: a merge of it alone refuses.
            assert main(["merge", "--download-dir", str(tmp_path / "dl"), "--output", str(output), "--quiet"]) == 1
            assert not output.exists(), capsys.readouterr().err
            capsys.readouterr()

        # The re-run is done: the next run's result is all of the new version.
        finish_writing(remote, ago=1800)
        code = await _main(_run_argv(config, tmp_path, "--quiet", *extra))
        err = capsys.readouterr().err
        assert code == 0, err
    for name in names:
        assert (tmp_path / "dl" / CLUSTER / name).read_bytes() == (new / name).read_bytes(), name
    _assert_same_result(load(output), new_result)


def test_a_set_rewritten_in_place_mid_copy_on_the_real_sshd_is_named_then_taken_whole(
        openssh, tmp_path, write_config, capsys):
    """The same rewrite against OpenSSH's sftp-server (which answers in order: the closing
    stat rides right behind the last read), triggered by the link: it stalls after
    2 MiB have reached the client, the re-run rewrites the set in place, the link
    resumes. Every file is named (exit 1, nothing merged); once the re-run is done, the
    next run's result is all of the new version."""
    remote, new, names, _, new_result = _a_set_and_its_rerun(tmp_path, tmp_path / "remote")
    output = tmp_path / "merged.pkl"
    with run_in_thread(openssh.host, openssh.port, rate=4 * MiB, stall_after=2 * MiB) as proxy, \
            ThreadPoolExecutor(1) as pool:
        config = write_config(tmp_path, {CLUSTER: openssh.cluster_entry(str(remote), port=proxy.port)})
        run = pool.submit(main, _run_argv(config, tmp_path))
        deadline = time.monotonic() + 30
        while not proxy.stalled and not run.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.stalled, "the link never reached 2 MiB"
        _rewrite(remote, new, "in-place")()
        proxy.loop.call_soon_threadsafe(proxy.resume)
        code = run.result(60)
        err = capsys.readouterr().err
        assert code == 1, err
        assert _named_once(err) == names, err
        _assert_closing_line_names(err, names)
        assert not output.exists() and "Traceback" not in err

        finish_writing(remote, ago=1800)
        assert main(_run_argv(config, tmp_path, "--quiet")) == 0, capsys.readouterr().err
    _assert_same_result(load(output), new_result)


def _at_terminal(command: list[str], columns: int, rows: int) -> tuple[int, Terminal]:
    with Terminal(command, columns=columns, lines=rows) as terminal:
        code = terminal.wait(timeout=60)
    return code, terminal


@pytest.mark.anyio
@pytest.mark.parametrize("when", ["mid-copy", "after-the-copies"])
async def test_a_set_fetched_twice_in_a_run_at_a_terminal_keeps_its_bars_within_100_percent(
        tmp_path, embedded_server, link_proxy, write_config, when):
    """--settle 0 at a pseudo-terminal: the set rewritten by rename mid-copy or after the
    copies, so that files are fetched again within the run (their bars and the total
    moved back and up): no bar ever shows more than 100 % or more MiB than its total,
    nothing crashes; exit 0 with the new version's result, or exit 1 naming files, with
    the closing line on rows of its own."""
    columns, rows = 80, 60
    remote, new, names, npy, new_result = _a_set_and_its_rerun(tmp_path, tmp_path / "srv")
    change = _rewrite(remote, new, "rename")
    server_class, fired = (_server_changing(at_read=(npy, npy.stat().st_size // 2), change=change)
                           if when == "mid-copy" else _server_changing(at_listing=2, change=change))
    async with embedded_server(tmp_path / "srv", sftp_factory=server_class) as server, \
            link_proxy(server, rate=4 * MiB) as proxy:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry(f"/{CLUSTER}", port=proxy.port)})
        command = [sys.executable, "-m", "async_embed_sync", *_run_argv(config, tmp_path, "--settle", "0")]
        code, terminal = await anyio.to_thread.run_sync(_at_terminal, command, columns, rows)
    assert fired, "the rewrite never happened"
    _assert_bars_within_100_percent(terminal)
    if when == "after-the-copies":
        assert code == 0, terminal.text()
    if code == 0:
        _assert_same_result(load(tmp_path / "merged.pkl"), new_result)
    else:
        assert code == 1, terminal.text()
        shown = _screen(terminal, columns, rows)
        _assert_shown_on_rows_of_its_own(shown, columns, rf"error: The sync did not finish\. {CLUSTER}: still being "
                                                         r"written there: .+ resumes where it stopped\.")


# ------------------------------------ 4: a rewrite in the same second, same size


@pytest.mark.anyio
@pytest.mark.parametrize(("shell", "settle_from"), [(True, "flag"), (False, "config")],
                         ids=["sha256sum-settle-flag", "no-shell-settle-seconds-in-config"])
async def test_a_rewrite_in_the_same_second_at_the_same_size_is_fetched_again(
        tmp_path, embedded_server, write_config, capsys, shell, settle_from):
    """A settle window of 0 (--settle 0, or "settle_seconds": 0 in credentials.json): a
    checkpoint synced the second it was written is recorded to be checked again;
    rewritten in that second at the same size (so its size and mtime are as listed),
    the next sync fetches it again and the copy is the new content, with or without a
    server hash to tell. Once it is old, it is trusted on its size and mtime: skipped."""
    remote = tmp_path / "srv" / "ckpt"
    path = remote / "embeddings_gpu0_00000000_00000500.pkl"
    versions = []
    for seed in (0, 1):
        write_legacy_checkpoint(path, make_vectors(0, 500, dim=64, seed=seed),
                                make_rows(0, 500, text_bytes=200, question_indices=(), seed=seed), start_index=0)
        versions.append(path.read_bytes())
    first, second = versions
    assert len(first) == len(second) and first != second
    layout = DownloadLayout(tmp_path / "dl")
    local = layout.final_path(CLUSTER, path.name)
    settle = ["--settle", "0"] if settle_from == "flag" else []
    argv = lambda: _run_argv(config, tmp_path, *settle, "--quiet", command="sync")  # noqa: E731

    async with embedded_server(tmp_path / "srv", allow_exec=shell) as server:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry("/ckpt")})
        if settle_from == "config":
            config.write_text(json.dumps({**json.loads(config.read_text()), "settle_seconds": 0}))
        path.write_bytes(first)
        written_at = int(time.time())
        os.utime(path, (written_at, written_at))
        assert await _main(argv()) == 0, capsys.readouterr().err
        assert local.read_bytes() == first
        state = layout.load_state(CLUSTER, path.name)
        assert state.complete and state.recheck, state  # too close to its listing to be trusted later

        with open(path, "r+b") as stream:  # the same second, the same size
            stream.write(second)
        os.utime(path, (written_at, written_at))
        assert (path.stat().st_size, int(path.stat().st_mtime)) == (state.remote_size, state.remote_mtime)
        assert await _main(argv()) == 0, capsys.readouterr().err
        assert local.read_bytes() == second
        state = layout.load_state(CLUSTER, path.name)
        assert state.complete and state.sha256 == hashlib.sha256(second).hexdigest()

        # Old now: fetched once for its new mtime, then trusted.
        finish_writing(remote, ago=1800)
        assert await _main(argv()) == 0, capsys.readouterr().err
        state = layout.load_state(CLUSTER, path.name)
        assert state.complete and not state.recheck and local.read_bytes() == second
        identity = local.stat().st_ino, state.verified_at
        assert await _main(argv()) == 0, capsys.readouterr().err
        assert (local.stat().st_ino, layout.load_state(CLUSTER, path.name).verified_at) == identity  # skipped


# ----------------------------------------- 5: a GPU's file re-split mid-run


@pytest.mark.anyio
@pytest.mark.parametrize("settle", ["default", "0"])
async def test_a_file_re_split_into_two_mid_run_never_merges_overlapping_or_missing_rows(
        tmp_path, embedded_server, link_proxy, write_config, capsys, settle):
    """gpu1's one .pkl is replaced, while the server reads its middle, by two files
    covering the same rows (a re-run that split it, other values): written beside it,
    then the old one removed. The run never exits 0 with the old and new rows both, or
    with rows missing: either the new files are named as still being written (exit 1,
    nothing merged), or the result is the merge of the files the cluster holds now; and
    once they are written, so is the next run's. After a run that named them, a `merge`
    of what is here alone either refuses or gives that same result (checked last, so
    that a failure there leaves the rest checked)."""
    remote = tmp_path / "srv" / CLUSTER
    old = generate_run(tmp_path / "srv", rows=2000, dim=256, clusters=(CLUSTER,), gpus_per_cluster=2, seed=0)
    split = generate_run(tmp_path / "resplit", rows=2000, dim=256, clusters=(CLUSTER,), gpus_per_cluster=2,
                         files_per_gpu=2, seed=1)
    replaced = old[1].resolve()
    new_parts = [p for p in split if "_gpu1_" in p.name]
    assert len(new_parts) == 2

    def resplit() -> None:
        for part in new_parts:
            temporary = remote / f".{part.name}.tmp"
            shutil.copyfile(part, temporary)
            os.replace(temporary, remote / part.name)
        replaced.unlink()

    server_class, fired = _server_changing(at_read=(replaced, replaced.stat().st_size // 2), change=resplit)
    extra = [] if settle == "default" else ["--settle", "0"]
    output, here = tmp_path / "merged.pkl", tmp_path / "merged-from-here.pkl"
    merge_alone: tuple[int, str] | None = None
    async with embedded_server(tmp_path / "srv", sftp_factory=server_class) as server, \
            link_proxy(server, rate=4 * MiB) as proxy:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry(f"/{CLUSTER}", port=proxy.port)})
        code = await _main(_run_argv(config, tmp_path, *extra))
        err = capsys.readouterr().err
        assert fired and not replaced.exists()
        assert "Traceback" not in err, err
        final = _merge_of({CLUSTER: remote}, tmp_path / "final")
        named = _named_once(err)
        if settle == "default":  # the new files were written a moment ago
            assert code == 1, err
            assert named == sorted(p.name for p in new_parts), err
        if code == 0:
            assert not named, err
            _assert_same_result(load(output), final)
        else:
            assert code == 1 and named and set(named) <= {p.name for p in new_parts}, err
            _assert_closing_line_names(err, named)
            assert not output.exists()
            # gpu1's rows are in the new files on the cluster now, partly fetched here: a
            # merge of what is here must not stand the old file's rows in for theirs.
            merge_alone = (main(["merge", "--download-dir", str(tmp_path / "dl"), "--output", str(here)]),
                           capsys.readouterr().err)

        finish_writing(remote, ago=1800)
        code = await _main(_run_argv(config, tmp_path, "--quiet", *extra))
        err = capsys.readouterr().err
        assert code == 0, err
    _assert_same_result(load(output), final)
    if merge_alone is not None:
        code, err = merge_alone
        assert "Traceback" not in err, err
        if code == 0:
            _assert_same_result(load(here), final, "the files the cluster held (gpu1 re-split there, other values; "
                                                   f"the new files partly fetched here). The merge said:\n{err}")
        else:
            assert code == 1 and not here.exists(), err


# ------------------------- --follow, when its --max-wait runs out on a live file


@pytest.mark.anyio
async def test_follow_that_runs_out_of_max_wait_says_it_gave_up_waiting_not_to_add_follow(
        tmp_path, embedded_server, write_config, capsys):
    """`run --follow --max-wait 2` while a checkpoint was written a moment ago (within the
    settle window): it waits, then gives up. Exit 1, nothing merged, and the closing line
    says it gave up waiting (--max-wait), naming the file; it does not tell a user who
    gave --follow to add --follow."""
    paths = generate_run(tmp_path / "srv", rows=400, dim=16, clusters=(CLUSTER,), gpus_per_cluster=2)
    async with embedded_server(tmp_path / "srv") as server:
        config = write_config(tmp_path, {CLUSTER: server.cluster_entry(f"/{CLUSTER}")})
        _written_ago(paths[1], 0)  # its job wrote it just now
        code = await _main(_run_argv(config, tmp_path, "--follow", "--poll", "1", "--max-wait", "2"))
        err = capsys.readouterr().err
    assert code == 1, err
    assert not (tmp_path / "merged.pkl").exists()
    closing = _closing_line(err)
    assert closing.startswith("error: Gave up waiting after ") and "(--max-wait)" in closing, closing
    assert paths[1].name in closing, closing
    assert "add --follow" not in closing, closing
