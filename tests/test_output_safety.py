"""The merge's output, nothing lost and nothing misleading: the user's files at --output, the publish,
what a killed merge leaves, free space, damaged local files, hostile sizes, completeness left unchecked.

Real files, real pickles, the real CLI: nothing under test is mocked.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM, entries

from async_embed_sync import load
from async_embed_sync.errors import AsyncEmbedSyncError, MergeValidationError, OutputError
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import generate_run, make_vectors

ROWS = 200


def _run(root: Path, fmt: str = "npy", **options: object) -> list[Path]:
    settings: dict = dict(rows=ROWS, dim=DIM, gpus_per_cluster=2, fmt=fmt, questions=2)
    settings.update(options)
    return generate_run(root, **settings)


def _refusal(downloads: Path, output: Path, **options: object) -> str:
    """The paragraph the CLI prints (``str`` of the error; exit 1: an ``AsyncEmbedSyncError``)."""
    with pytest.raises(AsyncEmbedSyncError) as caught:
        merge_checkpoints(downloads, output, **options)
    return str(caught.value)


# ------------------------------------------------------------ 1. the user's own pickle at --output


@pytest.mark.parametrize("name", ["my_model.pkl", "my_model.PICKLE"])
def test_the_users_own_pickle_at_the_output_is_refused_untouched(tmp_path: Path, name: str) -> None:
    _run(tmp_path / "downloads")
    mine = tmp_path / name
    mine.write_bytes(pickle.dumps({"mine": 1}))
    before = mine.read_bytes()

    message = _refusal(tmp_path / "downloads", mine)

    assert message.startswith(f"Output {mine}: exists and is not a merged result")
    assert message.endswith("Delete it first, or choose another --output.")
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["downloads", name])


@pytest.mark.parametrize("content", [
    pickle.dumps([{"embeddings": 1, "articles": 2}]),  # not a dict at the top
    pickle.dumps({"embeddings": {"articles": 1}, "x": 1}),  # the name, but nested
    pickle.dumps({"embeddings": [1.0, 2.0], "articles": []}),  # no array first
    b"",  # empty
    b"not a pickle at all\n",
], ids=["list", "nested", "no array", "empty", "text"])
def test_a_pickle_that_only_looks_like_a_result_is_refused(tmp_path: Path, content: bytes) -> None:
    _run(tmp_path / "downloads")
    mine = tmp_path / "mine.pkl"
    mine.write_bytes(content)

    with pytest.raises(OutputError, match="exists and is not a merged result"):
        merge_checkpoints(tmp_path / "downloads", mine)
    assert mine.read_bytes() == content


def test_a_symlink_at_a_pickle_output_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "real.pkl")
    (tmp_path / "link.pkl").symlink_to(tmp_path / "real.pkl")

    with pytest.raises(OutputError, match="exists and is not a merged result"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "link.pkl")
    assert (tmp_path / "link.pkl").is_symlink()


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_a_result_the_legacy_script_dumped_is_replaced(tmp_path: Path, protocol: int) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "wikipedia_merged.pkl"
    # What sync_and_merge_embeddings.py wrote: pickle.dump of the legacy dict.
    legacy = {
        "embeddings": np.ones((3000, DIM), np.float32),  # a payload past any prefix read
        "articles": [{"id": 1, "title": "old"}] * 3000,
        "total_articles": 3000, "embedding_dim": DIM, "model": "old", "timestamp": "then",
        "quality_metrics": {}, "chunk_info": [],
    }
    output.write_bytes(pickle.dumps(legacy, protocol=protocol))

    report = merge_checkpoints(tmp_path / "downloads", output)

    assert load(output)["total_articles"] == report.total_articles == ROWS - 2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_result_this_tool_wrote_is_replaced(tmp_path: Path, dtype: str) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "merged.pkl"
    merge_checkpoints(tmp_path / "downloads", output, dtype=dtype)
    _run(tmp_path / "downloads", seed=1)  # new vectors, same files

    merge_checkpoints(tmp_path / "downloads", output, dtype=dtype)

    assert np.array_equal(load(output)["embeddings"][0], make_vectors(0, 1, dim=DIM, seed=1)[0].astype(dtype))


def test_the_recogniser_reads_a_bounded_prefix_of_a_large_result(tmp_path: Path) -> None:
    """A result whose rows are 8 GiB (sparse here) is told from a few reads: its payloads are skipped."""
    from async_embed_sync.output.legacy_pickle import is_merged_result

    shape = (1 << 21, 1024)  # 8 GiB of float32 rows
    legacy = tmp_path / "legacy.pkl"
    with open(legacy, "wb") as stream:
        body = pickle.dumps({"embeddings": np.zeros((1, 1), np.float32), "articles": []}, protocol=4)
        # The same stream with the payload's length made 8 GiB, the bytes left a hole.
        small = np.zeros((1, 1), np.float32).tobytes()
        marker = b"\x8e" + len(small).to_bytes(8, "little") if b"\x8e" in body else b"C" + bytes([len(small)])
        at = body.index(marker + small)
        stream.write(body[:at] + b"\x8e" + (shape[0] * shape[1] * 4).to_bytes(8, "little"))
        stream.seek(shape[0] * shape[1] * 4, 1)
        stream.write(body[at + len(marker) + len(small):])
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, stream):
            self.stream = stream

        def read(self, n=-1):
            data = self.stream.read(n)
            reads.append(len(data))
            return data

        def readline(self, n=-1):
            data = self.stream.readline(n)
            reads.append(len(data))
            return data

        def seek(self, *args):
            return self.stream.seek(*args)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    import async_embed_sync.output.legacy_pickle as legacy_pickle
    legacy_pickle.open = lambda path, mode: Counting(real_open(path, mode))  # type: ignore[attr-defined]
    try:
        assert is_merged_result(legacy)
    finally:
        del legacy_pickle.open  # type: ignore[attr-defined]
    assert legacy.stat().st_size > 8 << 30
    assert sum(reads) < 4096


# ------------------------------------------------------------ 7. completeness not checked


def test_the_summary_says_once_that_completeness_could_not_be_checked(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    out = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged").summary()

    assert out.count("UNCHECKED") == 1
    assert '"total_rows": N in credentials.json' in out
    assert "write total_rows in its checkpoints" in out
    assert all(len(line) <= 80 for line in out.splitlines() if "UNCHECKED" in line or "total_rows" in line)


@pytest.mark.parametrize("declared", ["checkpoints", "config"])
def test_the_summary_says_nothing_of_it_when_a_total_is_known(tmp_path: Path, declared: str) -> None:
    _run(tmp_path / "downloads", declare_total=declared == "checkpoints")

    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged",
                               expect_rows=ROWS if declared == "config" else None)

    assert not report.completeness_unchecked
    assert "UNCHECKED" not in report.summary()


# ------------------------------------------------------------ 2. publish a bundle atomically


# A merge in a fresh interpreter, SIGKILLed at a publish step (the staging seam), after the
# whole result was written: argv[3] is the step, argv[4] "1" to take the fallback (no exchange).
_KILLED_AT_PUBLISH = """
import os, signal, sys
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.output import staging

def kill(step):
    if step == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

staging.on_publish_step = kill
staging.use_exchange = sys.argv[4] != "1"
merge_checkpoints(sys.argv[1], sys.argv[2])
"""


def _killed_at_publish(downloads: Path, output: Path, step: str, fallback: bool) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _KILLED_AT_PUBLISH, str(downloads), str(output), step, "1" if fallback else "0"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )


def _titles(output: Path) -> list[str]:
    return [article["title"] for article in load(output)["articles"]]


def test_a_bundle_is_swapped_in_one_step_and_a_kill_right_after_leaves_the_new_one(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "out" / "merged"
    merge_checkpoints(tmp_path / "downloads", output)
    _run(tmp_path / "downloads", seed=1)

    killed = _killed_at_publish(tmp_path / "downloads", output, "exchanged", fallback=False)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert np.array_equal(load(output)["embeddings"][0], make_vectors(0, 1, dim=DIM, seed=1)[0])
    # The previous bundle was in the killed merge's staging area: the next merge removes it.
    left = [name for name in entries(tmp_path / "out") if name != "merged"]
    assert len(left) == 1 and left[0].endswith(".merging")
    merge_checkpoints(tmp_path / "downloads", output)
    assert entries(tmp_path / "out") == ["merged"]


@pytest.mark.parametrize("next_merge", ["fails", "succeeds"])
def test_a_publish_killed_between_its_renames_loses_nothing(tmp_path: Path, caplog, next_merge: str) -> None:
    """The fallback without RENAME_EXCHANGE: killed with the old bundle moved aside, nothing at
    the output; the next merge puts it back before anything else, and says so."""
    paths = _run(tmp_path / "downloads")
    output = tmp_path / "out" / "merged"
    merge_checkpoints(tmp_path / "downloads", output)
    old = load(output)["embeddings"][:].copy()
    _run(tmp_path / "downloads", seed=1)

    killed = _killed_at_publish(tmp_path / "downloads", output, "moved aside", fallback=True)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not output.exists()
    previous = [name for name in entries(tmp_path / "out") if name.endswith(".previous")]
    assert len(previous) == 1
    if next_merge == "fails":
        paths[1].unlink()  # a gap: refused before any output
        with caplog.at_level("WARNING", logger="async_embed_sync"):
            with pytest.raises(MergeValidationError):
                merge_checkpoints(tmp_path / "downloads", output)
        assert np.array_equal(load(output)["embeddings"][:], old)
    else:
        with caplog.at_level("WARNING", logger="async_embed_sync"):
            merge_checkpoints(tmp_path / "downloads", output)
        assert np.array_equal(load(output)["embeddings"][0], make_vectors(0, 1, dim=DIM, seed=1)[0])
    assert f"Put back {output}" in caplog.text and previous[0] in caplog.text
    assert entries(tmp_path / "out") == ["merged"]


def test_a_moved_aside_result_whose_merge_still_runs_is_left_alone(tmp_path: Path) -> None:
    import socket

    _run(tmp_path / "downloads")
    output = tmp_path / "out" / "merged"
    merge_checkpoints(tmp_path / "downloads", output)
    # As a running merge (this process's parent, alive) leaves it between its renames.
    aside = output.with_name(f".merged.{socket.gethostname()}.{os.getppid()}.previous")
    output.rename(aside)

    merge_checkpoints(tmp_path / "downloads", output)

    assert aside.is_dir() and output.is_dir()


# ------------------------------------------------------------ 3. staging left by a killed merge


def _staging_names(folder: Path) -> list[str]:
    return [name for name in entries(folder) if name.startswith(".")]


def test_a_killed_merges_staging_is_removed_by_the_next_merge_into_its_folder(tmp_path: Path) -> None:
    """Whatever output the next merge is for: it sees the staging, its owner is dead, it goes."""
    _run(tmp_path / "downloads")
    killed = _killed_at_publish(tmp_path / "downloads", tmp_path / "out" / "first", "never", fallback=False)
    assert killed.returncode == 0, killed.stderr  # a merge to 'first' that completed, then:
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_COPY, str(tmp_path / "downloads"), str(tmp_path / "out" / "other.pkl")],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(_staging_names(tmp_path / "out")) == 1

    merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "third")

    assert entries(tmp_path / "out") == ["first", "third"]


_KILLED_MID_COPY = """
import os, signal, sys
from async_embed_sync.merging.merge import merge_checkpoints

def kill(progress):
    if progress.rows_done > 50:
        os.kill(os.getpid(), signal.SIGKILL)

merge_checkpoints(sys.argv[1], sys.argv[2], on_progress=kill)
"""


def test_staging_the_tool_did_not_make_or_of_a_live_merge_or_of_another_machine_is_kept(tmp_path: Path) -> None:
    import socket

    _run(tmp_path / "downloads")
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    dead = _dead_pid()
    kept = [
        f".notes.{host}.{dead}.merging",  # no random part: not a name the tool makes
        f".notes.{host}.{dead}.0123abcd.merging.bak",
        f".other.{host}.{os.getpid()}.0123abcd.merging",  # a live merge (this process)
        f".other.elsewhere.example.org.{dead}.0123abcd.merging",  # another machine's
    ]
    for name in kept:
        (out / name).mkdir()
    (out / f".file.{host}.{dead}.0123abcd.merging").write_text("a file, not a staging folder")
    kept.append(f".file.{host}.{dead}.0123abcd.merging")

    report = merge_checkpoints(tmp_path / "downloads", out / "merged")

    assert sorted(_staging_names(out)) == sorted(kept)
    assert report.staging_elsewhere == (out / f".other.elsewhere.example.org.{dead}.0123abcd.merging",)
    assert f"another machine's merge left {out}/.other.elsewhere.example.org" in report.summary()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ------------------------------------------------------------ 6. hostile sizes in a checkpoint


class _Calls:
    """Pickles as ``function(*arguments)``: what a hostile checkpoint asks the unpickler to call."""

    def __init__(self, function, *arguments):
        self.function, self.arguments = function, arguments

    def __reduce__(self):
        return self.function, self.arguments


def _reconstruct():
    return np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, by whichever name this numpy has


_shared = list(range(20_000))
_blob = bytes(50_000)
# One array state, held once in the file, that numpy would copy into every array BUILD gives it to
# (byte-swapped): 200 arrays of 1 MiB from a file of 1 MiB.
_swapped_state = (1, (1 << 17,), np.dtype(">f8"), False, bytes(1 << 20))


class _Built(_Calls):
    def __reduce__(self):
        return _reconstruct(), (np.ndarray, (0,), b"b"), _swapped_state
_HOSTILE = {
    "bytearray(2**31)": lambda: {"embeddings": _Calls(bytearray, 2**31)},
    "bytearray(2**40)": lambda: {"embeddings": _Calls(bytearray, 2**40)},
    "ndarray(shape)": lambda: {"embeddings": _Calls(np.ndarray, (2**31,), np.dtype("u1"))},
    "_reconstruct(shape)": lambda: {"embeddings": _Calls(_reconstruct(), np.ndarray, (2**16, 2**16), b"b")},
    "list copies": lambda: {"embeddings": [_Calls(list, _shared) for _ in range(2_000)]},  # 40M items from 100 KB
    "bytearray copies": lambda: {"embeddings": [_Calls(bytearray, _blob) for _ in range(2_000)]},  # 100 MB from 50 KB
    "array state copies": lambda: {"embeddings": [_Built(None) for _ in range(200)]},
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_a_hostile_checkpoint_asking_for_more_than_its_size_is_refused_before_allocating(tmp_path: Path, case: str) -> None:
    from async_embed_sync.errors import CheckpointError
    from async_embed_sync.merging.safe_pickle import restricted_load, restricted_load_mapped

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_HOSTILE[case](), protocol=4))

    for load_it in (restricted_load, restricted_load_mapped):
        with pytest.raises(CheckpointError) as caught:
            load_it(path)
        message = str(caught.value)
        assert message.startswith(f"Checkpoint {path}: the pickle holds a request for ")
        assert f"more than the file's own {path.stat().st_size:,} bytes can account for" in message


# The peak as VmHWM, this process's own: ru_maxrss keeps the parent's (pytest's) across fork and exec.
_MERGE_AND_SAY_PEAK_MEMORY = """
import re, sys
from async_embed_sync.errors import CheckpointError
from async_embed_sync.merging.merge import merge_checkpoints
try:
    merge_checkpoints(sys.argv[1], sys.argv[2])
except CheckpointError as exc:
    print(exc)
with open("/proc/self/status") as status:
    print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status.read())[1]) // 1024)
"""


def test_a_57_byte_checkpoint_asking_for_2_gib_fails_the_merge_in_little_memory(tmp_path: Path) -> None:
    path = tmp_path / "downloads" / "tensor01" / "embeddings_gpu0_00000000_00000010.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps(_Calls(bytearray, 2**31), protocol=2))
    assert path.stat().st_size < 64

    child = subprocess.run([sys.executable, "-c", _MERGE_AND_SAY_PEAK_MEMORY, str(tmp_path / "downloads"),
                            str(tmp_path / "merged.pkl")],
                           cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)

    message, peak_mib = child.stdout.strip().rsplit("\n", 1)
    assert child.returncode == 0, child.stderr
    assert "a request for 2,147,483,648 bytes (bytearray(n))" in message and str(path) in message
    assert int(peak_mib) < 400
    assert not (tmp_path / "merged.pkl").exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_what_numpy_and_python_pickle_still_loads_under_the_bound(tmp_path: Path, protocol: int) -> None:
    from async_embed_sync.merging.safe_pickle import restricted_load, restricted_load_mapped

    shared = np.arange(6.0)
    document = {"embeddings": np.arange(600_000, dtype=">f4").reshape(600, 1000), "ids": set(range(100)),
                "frozen": frozenset({1}), "raw": bytearray(b"abc" * 1000), "scalar": np.float32(3),
                "articles": [{"v": np.zeros(3, np.float16), "pair": (shared, 1)}, {"same": shared},
                             {"mixed": np.array([1, "x", np.zeros(2)], dtype=object)}],
                "empty": b""}
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps(document, protocol=protocol))
    plain = pickle.loads(path.read_bytes())

    for load_it in (restricted_load, restricted_load_mapped):
        loaded = load_it(path)

        assert np.array_equal(loaded["embeddings"], plain["embeddings"])
        assert loaded["embeddings"].dtype == plain["embeddings"].dtype
        assert loaded["ids"] == document["ids"] and loaded["raw"] == document["raw"] and loaded["empty"] == b""
        first, second, third = loaded["articles"]
        assert type(third["mixed"][2]) is np.ndarray and third["mixed"][1] == "x"
        assert type(first["v"]) is np.ndarray and type(first["pair"][0]) is np.ndarray
        assert first["pair"][0] is second["same"]  # shared as pickled
        assert np.array_equal(second["same"], shared)


# ------------------------------------------------------------ 5. a damaged complete local file


def _as_synced(paths: list[Path]) -> None:
    """Journal every checkpoint (and its parts) as a sync leaves it: complete, its real sha256 verified."""
    import hashlib

    from async_embed_sync.layout import DownloadLayout, FileState

    layout = DownloadLayout(paths[0].parent.parent)
    for path in paths:
        for part in sorted(path.parent.glob(path.stem + "*")):
            layout.prepare(part.parent.name)
            stat = part.stat()
            layout.record_complete(part.parent.name, part.name, FileState(stat.st_size, int(stat.st_mtime)),
                                   hashlib.sha256(part.read_bytes()).hexdigest(), "sha256")


def _flip_a_vector_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = int(path.stem.split("_")[2])
    at = data.index(make_vectors(start, start + 1, dim=DIM, seed=0)[0].tobytes())
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))  # the same size, one bit changed


@pytest.mark.parametrize("fmt", ["npy", "pkl"])
@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_a_complete_synced_file_damaged_here_fails_the_merge_naming_it(tmp_path: Path, fmt: str, output_name: str) -> None:
    paths = _run(tmp_path / "downloads", fmt)
    _as_synced(paths)
    damaged = paths[2]
    size = damaged.stat().st_size
    _flip_a_vector_byte(damaged)
    assert damaged.stat().st_size == size

    message = _refusal(tmp_path / "downloads", tmp_path / output_name)

    assert message.startswith(f"Checkpoint {damaged}: is not the file the sync verified on ")
    assert "Delete it and sync again (`sync` or `run`) to fetch it anew" in message
    assert entries(tmp_path) == ["downloads"]


def test_a_synced_file_rewritten_with_the_same_bytes_still_merges(tmp_path: Path) -> None:
    import hashlib

    paths = _run(tmp_path / "downloads", "mixed")
    _as_synced(paths)
    paths[1].write_bytes(paths[1].read_bytes())  # a new identity, the bytes verified

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    chunk = load(tmp_path / "merged.pkl")["chunk_info"][1]
    assert chunk["sha256"] == hashlib.sha256(paths[1].read_bytes()).hexdigest()


def test_a_file_no_sync_recorded_complete_is_not_held_to_a_hash(tmp_path: Path) -> None:
    from async_embed_sync.layout import DownloadLayout, FileState

    paths = _run(tmp_path / "downloads", "npy")
    layout = DownloadLayout(tmp_path / "downloads")
    layout.prepare(paths[0].parent.name)
    # A sync under way for a newer version: its journal holds a partial's state.
    layout.save_state(paths[0].parent.name, paths[0].name, FileState(1, 1, complete=False, sha256="ab" * 32))
    _flip_a_vector_byte(paths[0])

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged")


# ------------------------------------------------------------ 4. free space before merging


@contextlib.contextmanager
def _tmpfs(directory: Path, size: str):
    """A real tmpfs of ``size`` at ``directory`` (root only); skipped where it cannot be
    mounted, except under CI, where that is a failure."""
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"cannot mount a tmpfs under CI: {mounted.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_a_result_its_file_system_has_no_room_for_is_refused_up_front(tmp_path: Path, output_name: str) -> None:
    _run(tmp_path / "downloads", rows=2000, dim=384)  # 3 MiB of float32 rows
    with _tmpfs(tmp_path / "small", "2m") as small:
        output = small / output_name

        message = _refusal(tmp_path / "downloads", output)

        assert message.startswith(f"Cannot write {output}: not enough disk space: needs 3.")
        assert f" MiB free on {small} (the merged result, estimated" in message
        assert entries(small) == []


def test_a_result_that_fits_the_same_small_file_system_is_written(tmp_path: Path) -> None:
    _run(tmp_path / "downloads", rows=2000, dim=384, fmt="mixed")
    with _tmpfs(tmp_path / "small", "12m") as small:
        merge_checkpoints(tmp_path / "downloads", small / "merged.pkl")
        assert load(small / "merged.pkl")["total_articles"] == 1998


def _parse_size(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit]


@pytest.mark.parametrize("fmt", ["npy", "pkl"])
def test_the_free_space_check_counts_rows_dim_dtype_and_articles(tmp_path: Path, fmt: str) -> None:
    paths = _run(tmp_path / "downloads", fmt, rows=1000, dim=256)
    asked: list[Path] = []

    def free(path: Path) -> tuple[int, str]:
        asked.append(path)
        return 400 << 10, "/mnt/x"

    message = _refusal(tmp_path / "downloads", tmp_path / "merged", dtype="float16", free_space=free)

    assert message.startswith(f"Cannot write {tmp_path / 'merged'}: not enough disk space: needs ")
    needs = _parse_size(message.split("needs ")[1].split(",")[0])
    assert ", 400.0 KiB free on /mnt/x (" in message
    rows_and_hashes = 998 * 256 * 2 + 1000 * 16  # the article rows in float16; the row hashes
    if fmt == "npy":
        articles = sum(path.with_suffix(".jsonl").stat().st_size for path in paths)
        assert abs(needs - (rows_and_hashes + articles)) < 0.06 * 1024
    else:  # the articles as the legacy checkpoints' staging encoded them: some of each file
        assert rows_and_hashes < needs < rows_and_hashes + sum(path.stat().st_size for path in paths)
    assert asked and asked[0].parent == tmp_path  # the staging area's file system
    assert entries(tmp_path) == ["downloads"]
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged", dtype="float16",
                      free_space=lambda path: (10 << 20, "/mnt/x"))


@pytest.mark.parametrize("part", [".json", ".jsonl"])
def test_a_npy_checkpoints_synced_sidecar_or_articles_damaged_here_fail_the_merge_naming_them(
        tmp_path: Path, part: str) -> None:
    paths = _run(tmp_path / "downloads", "npy")
    _as_synced(paths)
    damaged = paths[1].with_suffix(part)
    data = bytearray(damaged.read_bytes())
    # A same-size change that still reads: a digit in the sidecar's hostname, a letter in an article's text.
    at = data.index(b"tensor01-node") + 7 if part == ".json" else data.index(b'"text": "') + 12
    data[at] = ord("Q") if part == ".jsonl" else ord("2")
    damaged.write_bytes(bytes(data))

    message = _refusal(tmp_path / "downloads", tmp_path / "merged")

    assert message.startswith(f"Checkpoint {damaged}: is not the file the sync verified on ")
    assert entries(tmp_path) == ["downloads"]
