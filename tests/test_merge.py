from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from merge_fixtures import DIM, entries, expected_merge

from async_embed_sync.errors import (
    AsyncEmbedSyncError,
    CheckpointError,
    MergeValidationError,
    OutputError,
)
from async_embed_sync.merging.merge import MergeProgress, merge_checkpoints
from async_embed_sync import load
from async_embed_sync.output import OutputSpec
from async_embed_sync.output.writer import OutputWriter
from async_embed_sync.testing.synthetic import (
    generate_run,
    make_rows,
    make_vectors,
    write_legacy_checkpoint,
    write_npy_checkpoint,
)

ROWS = 400
QUESTIONS = {0, 150, 151, 399}


def _run(root: Path, fmt: str = "pkl", **options: object) -> list[Path]:
    settings: dict = dict(rows=ROWS, dim=DIM, files_per_gpu=2, fmt=fmt, question_indices=QUESTIONS)
    settings.update(options)
    return generate_run(root, **settings)


@pytest.mark.parametrize("fmt", ["pkl", "npy", "mixed"])
@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_merge_equals_a_naive_in_memory_merge(tmp_path: Path, fmt: str, output_name: str) -> None:
    _run(tmp_path / "downloads", fmt)
    embeddings, articles = expected_merge(ROWS, QUESTIONS)

    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / output_name)

    merged = load(tmp_path / "out" / output_name)
    assert np.array_equal(merged["embeddings"], embeddings)
    assert merged["embeddings"].dtype == np.float32
    assert merged["articles"] == articles
    assert merged["total_articles"] == report.total_articles == ROWS - len(QUESTIONS)
    assert report.dropped_rows == merged["quality_metrics"]["dropped_non_article_rows"] == len(QUESTIONS)
    assert [chunk["start_index"] for chunk in merged["chunk_info"]] == sorted(
        chunk["start_index"] for chunk in merged["chunk_info"]
    )
    assert sum(chunk["articles_kept"] for chunk in merged["chunk_info"]) == ROWS - len(QUESTIONS)
    assert entries(tmp_path / "out") == [output_name]


def test_chunk_info_describes_each_checkpoint(tmp_path: Path) -> None:
    import hashlib

    paths = _run(tmp_path / "downloads", "mixed")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    chunks = load(tmp_path / "merged.pkl")["chunk_info"]

    first = chunks[0]
    assert len(chunks) == len(paths)
    assert first["file"] == paths[0].name and first["cluster"] == "tensor01"
    assert (first["gpu_id"], first["hostname"], first["start_index"]) == (0, "tensor01-node", 0)
    assert first["rows"] == first["end_index"] and first["articles_kept"] == first["rows"] - 1
    assert first["size_bytes"] == paths[0].stat().st_size
    assert first["sha256"] == hashlib.sha256(paths[0].read_bytes()).hexdigest()
    assert chunks[-1]["cluster"] == "tensor02"


def test_chunk_info_takes_the_sha256_the_sync_recorded_while_the_file_is_untouched(tmp_path: Path) -> None:
    import hashlib

    from async_embed_sync.layout import DownloadLayout, FileState, file_identity

    paths = _run(tmp_path / "downloads", "mixed")
    layout = DownloadLayout(tmp_path / "downloads")
    # Recorded hashes that differ from the files' own show where chunk_info's came from.
    for path in paths:
        layout.prepare(path.parent.name)
        layout.save_state(path.parent.name, path.name, FileState(
            1, 1, complete=True, sha256=f"recorded {path.name}", local_identity=file_identity(path)))
    edited = next(path for path in paths if path.suffix == ".npy")
    edited.write_bytes(edited.read_bytes())  # same bytes, but no longer the file that was hashed

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged")

    sha256 = {chunk["file"]: chunk["sha256"] for chunk in load(tmp_path / "merged")["chunk_info"]}
    assert sha256.pop(edited.name) == hashlib.sha256(edited.read_bytes()).hexdigest()
    assert sha256 == {path.name: f"recorded {path.name}" for path in paths if path != edited}


@pytest.mark.parametrize("fmt", ["npy", "pkl"])
def test_a_synced_checkpoint_changed_during_the_merge_fails_it(tmp_path: Path, fmt: str) -> None:
    from async_embed_sync.layout import DownloadLayout, FileState, file_identity

    paths = _run(tmp_path / "downloads", fmt)
    layout = DownloadLayout(tmp_path / "downloads")
    for path in paths:
        layout.prepare(path.parent.name)
        layout.save_state(path.parent.name, path.name, FileState(
            1, 1, complete=True, sha256="ab" * 32, local_identity=file_identity(path)))

    def touch_the_file_being_read(progress: MergeProgress) -> None:
        progress.checkpoint.chmod(0o600)  # a new change time, as any write would give

    with pytest.raises(CheckpointError, match="changed while it was being merged"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "merged", on_progress=touch_the_file_being_read)
    assert not (tmp_path / "merged").exists()


def test_float16_output(tmp_path: Path) -> None:
    _run(tmp_path / "downloads", "mixed")
    embeddings, _ = expected_merge(ROWS, QUESTIONS)

    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", dtype="float16")

    merged = load(tmp_path / "merged.pkl")["embeddings"]
    assert merged.dtype == np.float16 and report.dtype == "float16"
    assert np.array_equal(merged, embeddings.astype(np.float16))


def test_summary_states_rows_drops_metrics_time_and_memory(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    summary = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl").summary()

    assert f"{ROWS - len(QUESTIONS)} articles" in summary
    assert f"dropped {len(QUESTIONS)} non-article rows" in summary
    assert "0 NaN" in summary and "duplicate rows" in summary
    assert "took " in summary and "MiB" in summary
    lines = summary.splitlines()
    assert lines[1] == f"  {tmp_path / 'merged.pkl'}"  # the path on a line of its own
    assert all(len(line) <= 80 for line in lines[:1] + lines[2:]), summary  # an 80-column terminal


def test_progress_reaches_every_row(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    seen: list[MergeProgress] = []

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", on_progress=seen.append)

    assert seen[-1].rows_done == seen[-1].rows_total == ROWS
    assert len(seen) == 16


# ------------------------------------------------------------------ validation


def _write(root: Path, start: int, end: int, fmt: str = "pkl", **overrides: object) -> Path:
    embeddings = overrides.pop("embeddings", make_vectors(start, end, dim=DIM, seed=0))
    articles = make_rows(start, end, text_bytes=20, question_indices=(), seed=0)
    stem = root / "tensor09" / f"extra_{start}_{end}"
    arguments: dict = dict(start_index=start, model="google/embeddinggemma-300m")
    arguments.update(overrides)
    if fmt == "pkl":
        return write_legacy_checkpoint(stem.with_suffix(".pkl"), embeddings, articles, **arguments)
    return write_npy_checkpoint(stem, embeddings, articles, **arguments)


def _break_by_removing(paths: list[Path], index: int) -> Path:
    paths[index].unlink()
    return paths[index]


def _gap(root: Path, paths: list[Path]) -> None:
    _break_by_removing(paths, 5)


def _wrong_start(root: Path, paths: list[Path]) -> None:
    _break_by_removing(paths, 0)


def _overlap(root: Path, paths: list[Path]) -> None:
    _write(root, 30, 40)


def _dim_mismatch(root: Path, paths: list[Path]) -> None:
    paths[3].unlink()
    start, end = (int(part) for part in paths[3].stem.split("_")[-2:])
    _write(root, start, end, embeddings=np.ones((end - start, DIM + 1), np.float32))


def _model_mismatch(root: Path, paths: list[Path]) -> None:
    paths[3].unlink()
    start, end = (int(part) for part in paths[3].stem.split("_")[-2:])
    _write(root, start, end, model="another/model")


def _integer_dtype(root: Path, paths: list[Path]) -> None:
    paths[3].unlink()
    start, end = (int(part) for part in paths[3].stem.split("_")[-2:])
    _write(root, start, end, "npy", embeddings=np.ones((end - start, DIM), np.int32))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_gap, r"indices 125\.\.149 are missing"),
        (_wrong_start, r"starts at index 25, not 0"),
        (_overlap, r"extra_30_40\.pkl \[30, 40\) overlap at indices 30\.\.39"),
        (_dim_mismatch, r"has dimension 16 but .* has 17"),
        (_model_mismatch, r"'another/model'"),
        (_integer_dtype, r"int32 values, not floats"),
    ],
)
def test_inconsistent_checkpoints_are_refused_before_anything_is_written(tmp_path: Path, damage, message: str) -> None:
    paths = _run(tmp_path / "downloads", "mixed")
    damage(tmp_path / "downloads", paths)

    with pytest.raises(MergeValidationError, match=message):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl")

    assert entries(tmp_path / "out") == []


def test_gap_names_both_files(tmp_path: Path) -> None:
    paths = _run(tmp_path / "downloads", "pkl")
    paths[5].unlink()

    with pytest.raises(MergeValidationError) as caught:
        merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    assert str(paths[4]) in str(caught.value) and str(paths[6]) in str(caught.value)


@pytest.mark.parametrize("fmt", ["pkl", "npy"])
def test_row_count_mismatch_is_refused(tmp_path: Path, fmt: str) -> None:
    _write(tmp_path / "downloads", 0, 10, fmt, end_index=12)

    with pytest.raises(CheckpointError, match="spans 12 rows but the array has 10"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl")
    assert entries(tmp_path / "out") == []


def test_articles_length_mismatch_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "downloads", 0, 10, "npy")
    lines = path.with_suffix(".jsonl").read_text().splitlines()
    path.with_suffix(".jsonl").write_text("\n".join(lines[:-1]) + "\n")

    with pytest.raises(CheckpointError, match="9 entries"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl")
    assert entries(tmp_path / "out") == []


def _replace_jsonl_line(checkpoint: Path, number: int, line: str) -> Path:
    articles = checkpoint.with_suffix(".jsonl")
    lines = articles.read_text().splitlines()
    lines[number - 1] = line
    articles.write_text("\n".join(lines) + "\n")
    return articles


_OUTPUT_FORMS = [
    ("merged.pkl", None),
    ("merged", "jsonl"),
    ("merged", "parquet"),
]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "40", "title": "x",}', "is not JSON"),  # looks like an object: not caught by the index
        ('{"id": "40" "title": "x"}', "is not JSON"),
        ('{"id": "40", "title": "\xff"}', "is not JSON"),  # not UTF-8 once written as latin-1 below
        ('["40", "x"]', "is not a JSON object"),  # valid JSON, not an object
        ('"40"', "is not a JSON object"),
    ],
)
@pytest.mark.parametrize(("output_name", "articles_format"), _OUTPUT_FORMS)
def test_a_broken_jsonl_line_is_refused_before_anything_is_written(
    tmp_path: Path, line: str, problem: str, output_name: str, articles_format: str | None
) -> None:
    paths = _run(tmp_path / "downloads", "npy")
    articles = _replace_jsonl_line(paths[2], 7, line)
    if "\xff" in line:
        articles.write_bytes(articles.read_bytes().replace("\xff".encode(), b"\xff"))

    with pytest.raises(CheckpointError) as caught:
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / output_name, articles_format=articles_format)

    assert str(articles) in str(caught.value) and f"line 7 {problem}" in str(caught.value)
    assert entries(tmp_path / "out") == []
    assert multiprocessing.active_children() == []  # no worker left behind


def test_a_broken_line_in_the_last_checkpoint_is_found_after_the_copy(tmp_path: Path) -> None:
    paths = _run(tmp_path / "downloads", "npy")
    last = max(paths, key=lambda path: int(path.stem.split("_")[-1]))
    articles = _replace_jsonl_line(last, 3, '{"id": "x", "title": "y", "text": "unterminated}')
    (tmp_path / "out").mkdir()

    with pytest.raises(CheckpointError, match=f"{articles}.*line 3 is not JSON"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged", articles_format="jsonl")
    assert entries(tmp_path / "out") == []


def test_expected_article_count_is_checked(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    with pytest.raises(MergeValidationError, match="400 articles were expected but the checkpoints hold 396"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl", expect_articles=400)
    assert entries(tmp_path / "out") == []
    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl", expect_articles=396)
    assert report.total_articles == 396


def test_no_checkpoints_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "downloads" / "tensor01").mkdir(parents=True)

    with pytest.raises(MergeValidationError, match="no checkpoints"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")


def test_a_download_folder_that_does_not_exist_is_named_as_such(tmp_path: Path) -> None:
    with pytest.raises(MergeValidationError) as caught:
        merge_checkpoints(tmp_path / "nothing-here", tmp_path / "merged.pkl")
    assert f"{tmp_path / 'nothing-here'} does not exist" in str(caught.value)
    assert "--download-dir" in str(caught.value) and not (tmp_path / "merged.pkl").exists()


@pytest.mark.parametrize("output", ["made/for/it/merged.pkl", "made/for/it/bundle"])
def test_a_failed_merge_removes_the_folders_it_made_for_its_output_and_only_those(tmp_path: Path, output) -> None:
    (tmp_path / "downloads" / "tensor01").mkdir(parents=True)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("the user's")

    for where in (tmp_path / output, tmp_path / "kept" / output):
        with pytest.raises(MergeValidationError, match="no checkpoints"):
            merge_checkpoints(tmp_path / "downloads", where)
    left = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert left == ["downloads", "downloads/tensor01", "kept", "kept/notes.txt"]


def test_unknown_output_dtype_is_refused(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    with pytest.raises(MergeValidationError, match="float64"):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", dtype="float64")


def _write_run_with_nan(root: Path) -> Path:
    paths = _run(root, "pkl")
    start, end = (int(part) for part in paths[-1].stem.split("_")[-2:])
    embeddings = make_vectors(start, end, dim=DIM, seed=0)
    embeddings[2, 5] = np.nan
    embeddings[3, 1] = np.inf
    articles = make_rows(start, end, text_bytes=200, question_indices=QUESTIONS, seed=0)
    write_legacy_checkpoint(paths[-1], embeddings, articles, start_index=start, model="google/embeddinggemma-300m")
    return paths[-1]


def test_nan_and_inf_are_counted(tmp_path: Path) -> None:
    _write_run_with_nan(tmp_path / "downloads")

    report = merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    metrics = report.quality_metrics
    assert (metrics["nan_values"], metrics["inf_values"], metrics["nonfinite_rows"]) == (1, 1, 2)


def test_strict_makes_nan_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    bad = _write_run_with_nan(tmp_path / "downloads")

    with pytest.raises(MergeValidationError, match="NaN or Inf") as caught:
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / "merged.pkl", strict=True)

    assert str(bad) in str(caught.value)
    assert entries(tmp_path / "out") == []


# ------------------------------------------------------------- failure safety


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_interrupted_merge_leaves_no_output_and_no_temporaries(
    tmp_path: Path, interruption: type[BaseException], output_name: str
) -> None:
    _run(tmp_path / "downloads")

    def interrupt_after_third_block(progress: MergeProgress) -> None:
        if progress.rows_done > 3 * 25:
            raise interruption()

    with pytest.raises(interruption):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "out" / output_name, on_progress=interrupt_after_third_block)

    assert entries(tmp_path / "out") == []


def test_failed_merge_keeps_the_previous_output(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")
    before = (tmp_path / "merged.pkl").read_bytes()

    with pytest.raises(AsyncEmbedSyncError):
        merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl", expect_articles=1)

    assert (tmp_path / "merged.pkl").read_bytes() == before


def test_successful_merge_replaces_a_previous_bundle(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle", dtype="float16")

    merge_checkpoints(tmp_path / "downloads", tmp_path / "bundle")

    assert load(tmp_path / "bundle")["embeddings"].dtype == np.float32
    assert entries(tmp_path) == ["bundle", "downloads"]


# Prints the pids of its child processes (the article worker, for a bundle) before it dies.
_KILLED_MERGE = """
import os, signal, sys
from async_embed_sync.merging.merge import merge_checkpoints

def kill_after_third_block(progress):
    if progress.rows_done > 3 * 25:
        with open(f"/proc/self/task/{os.getpid()}/children") as children:
            print(children.read(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

merge_checkpoints(sys.argv[1], sys.argv[2], on_progress=kill_after_third_block)
"""


def _merge_in_a_child(script: str, downloads: Path, output: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter, given ``downloads`` and ``output`` as its arguments."""
    return subprocess.run(
        [sys.executable, "-c", script, str(downloads), str(output)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )


def _killed_merge(downloads: Path, output: Path) -> subprocess.CompletedProcess[str]:
    return _merge_in_a_child(_KILLED_MERGE, downloads, output)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # an unreaped zombie has ended


@pytest.mark.parametrize("output_name", ["merged.pkl", "merged"])
def test_killed_merge_leaves_nothing_at_the_output_path(tmp_path: Path, output_name: str) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "out" / output_name

    finished = _killed_merge(tmp_path / "downloads", output)

    assert finished.returncode == -signal.SIGKILL, finished.stderr
    assert not output.exists()
    # Only the hidden staging directory is left, which is never the output.
    assert all(name.startswith(f".{output_name}.") for name in entries(tmp_path / "out"))


def test_a_killed_merge_takes_its_article_worker_down(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")

    finished = _killed_merge(tmp_path / "downloads", tmp_path / "out" / "merged")

    assert finished.returncode == -signal.SIGKILL, finished.stderr
    workers = [int(pid) for pid in finished.stdout.split()]
    assert len(workers) == 1
    deadline = time.monotonic() + 30  # a bounded wait: the worker ends when it reads the end of its pipe
    while any(map(_running, workers)):
        assert time.monotonic() < deadline, f"the article worker {workers} outlived the killed merge"
        time.sleep(0.02)


_MERGE_THEN_PRINT_IF_PYARROW_IS_IMPORTED = """
import sys
from async_embed_sync.merging.merge import merge_checkpoints

merge_checkpoints(sys.argv[1], sys.argv[2], articles_format="parquet")
print("pyarrow" in sys.modules)
"""


def test_a_parquet_merge_leaves_pyarrow_to_the_worker(tmp_path: Path) -> None:
    """pyarrow and its memory pool stay out of the merge process."""
    _run(tmp_path / "downloads")

    finished = _merge_in_a_child(_MERGE_THEN_PRINT_IF_PYARROW_IS_IMPORTED, tmp_path / "downloads", tmp_path / "merged")

    assert finished.returncode == 0, finished.stderr
    assert finished.stdout == "False\n"
    assert (tmp_path / "merged" / "metadata" / "part-00000.parquet").is_file()


def test_legacy_output_loads_with_plain_pickle(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    with open(tmp_path / "merged.pkl", "rb") as stream:
        document = pickle.load(stream)  # our own output, as downstream scripts read it

    assert list(document) == [
        "embeddings", "articles", "total_articles", "embedding_dim", "model", "timestamp", "quality_metrics", "chunk_info"
    ]
    assert type(document["articles"]) is list and type(document["embeddings"]) is np.ndarray
    assert document["embeddings"].flags.writeable
    assert json.loads(json.dumps(document["quality_metrics"])) == document["quality_metrics"]


def test_a_merge_after_a_killed_one_removes_its_staging(tmp_path: Path) -> None:
    _run(tmp_path / "downloads")
    output = tmp_path / "out" / "merged.pkl"
    _killed_merge(tmp_path / "downloads", output)
    assert len(entries(tmp_path / "out")) == 1

    merge_checkpoints(tmp_path / "downloads", output)

    assert entries(tmp_path / "out") == ["merged.pkl"]


# ------------------------------------------------- legacy checkpoints read once


@pytest.mark.parametrize("fmt", ["pkl", "mixed"])
@pytest.mark.parametrize(("output_name", "articles_format"), _OUTPUT_FORMS)
def test_each_legacy_checkpoint_is_unpickled_once_and_merged_exactly(
    tmp_path: Path, fmt: str, output_name: str, articles_format: str | None
) -> None:
    from async_embed_sync.merging.merge import select_checkpoints

    _run(tmp_path / "downloads", fmt)
    read_order, _ = select_checkpoints(tmp_path / "downloads")
    replaced: list[Path] = []

    def unreadable_once_read(done: int, total: int) -> None:
        # Each legacy checkpoint stops being a pickle as soon as it has been read: a merge
        # that unpickled one again would fail ("not a readable pickle"), or merge other rows.
        path = read_order[done - 1]
        if path.suffix == ".pkl":
            path.with_name(".replacement").write_bytes(b"not a pickle")
            path.with_name(".replacement").replace(path)  # a new file: a reader's open one is untouched
            replaced.append(path)

    embeddings, articles = expected_merge(ROWS, QUESTIONS)

    merge_checkpoints(
        tmp_path / "downloads", tmp_path / "out" / output_name, articles_format=articles_format,
        on_read=unreadable_once_read,
    )

    assert replaced == [path for path in read_order if path.suffix == ".pkl"] and replaced
    merged = load(tmp_path / "out" / output_name)
    assert np.array_equal(merged["embeddings"], embeddings) and merged["articles"] == articles
    assert entries(tmp_path / "out") == [output_name]  # no scratch file left, in the bundle or beside it


@pytest.mark.parametrize(("output_name", "articles_format"), _OUTPUT_FORMS)
def test_legacy_checkpoints_merge_exactly_into_float16(
    tmp_path: Path, output_name: str, articles_format: str | None
) -> None:
    _run(tmp_path / "downloads", "pkl")
    embeddings, articles = expected_merge(ROWS, QUESTIONS)

    merge_checkpoints(tmp_path / "downloads", tmp_path / output_name, dtype="float16", articles_format=articles_format)

    merged = load(tmp_path / output_name)
    assert merged["embeddings"].dtype == np.float16
    assert np.array_equal(merged["embeddings"], embeddings.astype(np.float16)) and merged["articles"] == articles


def _write_out_of_order_run(root: Path, read_order: list[int], names: str = "{rank:02d}.pkl") -> None:
    """Four legacy checkpoints of 30 rows, named by ``names`` from their rank in ``read_order`` of
    their index ranges; rows repeat across files, and one holds a NaN."""
    vectors = make_vectors(0, 120, dim=DIM, seed=3)
    vectors[95:100] = vectors[5:10]  # duplicates in the last file of rows of the first
    vectors[100] = vectors[100] * 1e3
    vectors[31, 4] = np.nan
    rows = make_rows(0, 120, text_bytes=20, question_indices={12, 64}, seed=3)
    for rank, piece in enumerate(read_order):
        start = piece * 30
        write_legacy_checkpoint(
            root / "tensor01" / names.format(rank=rank * 5), vectors[start : start + 30], rows[start : start + 30],
            start_index=start, model="m",
        )


def test_metrics_do_not_depend_on_the_order_the_checkpoints_are_read(tmp_path: Path) -> None:
    _write_out_of_order_run(tmp_path / "in_order", [0, 1, 2, 3])
    _write_out_of_order_run(tmp_path / "shuffled", [2, 0, 3, 1])

    in_order = merge_checkpoints(tmp_path / "in_order", tmp_path / "in_order.pkl")
    shuffled = merge_checkpoints(tmp_path / "shuffled", tmp_path / "shuffled.pkl")

    assert shuffled.quality_metrics == in_order.quality_metrics  # bit for bit, norms included
    assert in_order.quality_metrics["duplicate_rows"] == 5 and in_order.quality_metrics["nan_values"] == 1
    first, second = load(tmp_path / "in_order.pkl"), load(tmp_path / "shuffled.pkl")
    assert np.array_equal(first["embeddings"], second["embeddings"], equal_nan=True)
    assert first["articles"] == second["articles"] and len(first["articles"]) == 118
    assert [chunk["start_index"] for chunk in second["chunk_info"]] == [0, 30, 60, 90]


class _OutputNeverOpened(OutputSpec):
    """A spec whose writer must not be opened: the merge fails before the output is created."""

    def open_writer(self, *arguments: object, **keywords: object) -> OutputWriter:
        raise AssertionError("the output was created")


def _never_opened(output: Path) -> OutputSpec:
    return _OutputNeverOpened(**vars(OutputSpec.decide(output)))


@pytest.mark.parametrize("damage", [_gap, _overlap, _model_mismatch])
def test_validation_fails_before_the_output_is_created(tmp_path: Path, damage) -> None:
    paths = _run(tmp_path / "downloads", "pkl")
    damage(tmp_path / "downloads", paths)

    with pytest.raises(MergeValidationError):
        merge_checkpoints(tmp_path / "downloads", _never_opened(tmp_path / "out" / "merged.pkl"))
    assert entries(tmp_path / "out") == []


def test_strict_fails_on_a_legacy_checkpoint_before_the_output_is_created(tmp_path: Path) -> None:
    _write_run_with_nan(tmp_path / "downloads")

    with pytest.raises(MergeValidationError, match="NaN or Inf"):
        merge_checkpoints(tmp_path / "downloads", _never_opened(tmp_path / "out" / "merged"), strict=True)
    assert entries(tmp_path / "out") == []


_MERGE_WITH_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
from async_embed_sync.errors import LocalFileError
from async_embed_sync.merging.merge import merge_checkpoints

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    merge_checkpoints(sys.argv[1], sys.argv[2])
except LocalFileError as exc:
    sys.exit(str(exc))
"""


def test_a_full_disk_while_legacy_checkpoints_are_read_is_a_local_file_error(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=2000, dim=256, fmt="pkl")  # 2 MB of rows: over the limit
    output = tmp_path / "out" / "merged.pkl"

    finished = _merge_in_a_child(_MERGE_WITH_A_FILE_SIZE_LIMIT, tmp_path / "downloads", output)

    assert finished.returncode == 1
    assert f"Cannot write {output}: File too large; free some space" in finished.stderr, finished.stderr
    assert entries(tmp_path / "out") == []


@pytest.mark.parametrize(
    ("read_order", "names", "in_place"),
    [
        ([0, 1, 2, 3], "{rank:02d}.pkl", True),
        ([0, 1, 2, 3], "ckpt_{rank}.pkl", True),  # ckpt_5 before ckpt_10: natural order
        ([2, 0, 3, 1], "{rank:02d}.pkl", False),
    ],
)
def test_rows_read_in_index_order_stay_where_they_were_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_order: list[int], names: str, in_place: bool
) -> None:
    _write_out_of_order_run(tmp_path / "downloads", read_order, names)
    rows_copied: list[int] = []
    copy_file_range = os.copy_file_range

    def recorded_copy_file_range(source_fd: int, target_fd: int, count: int, offset_src=None, offset_dst=None):
        if offset_dst is not None:  # rows into the embeddings region (articles are appended)
            rows_copied.append(count)
        return copy_file_range(source_fd, target_fd, count, offset_src, offset_dst)

    # Watched where the copies reach the OS: rows left in place are never copied.
    monkeypatch.setattr(os, "copy_file_range", recorded_copy_file_range)

    merge_checkpoints(tmp_path / "downloads", tmp_path / "merged.pkl")

    assert rows_copied == ([] if in_place else [articles * DIM * 4 for articles in (29, 30, 29, 30)])
    merged = load(tmp_path / "merged.pkl")
    expected = make_vectors(0, 120, dim=DIM, seed=3)
    assert len(merged["articles"]) == 118 and np.array_equal(merged["embeddings"][:2], expected[:2])


# ------------------------------------------------- threads and processes owned


def _child_pids() -> set[int]:
    return {int(pid) for children in Path("/proc/self/task").glob("*/children") for pid in children.read_text().split()}


def _last_npy(paths: list[Path]) -> Path:
    return max((path for path in paths if path.suffix == ".npy"), key=lambda path: int(path.stem.split("_")[-1]))


def _nan_in_the_last_npy(downloads: Path, output: Path) -> dict:
    rows = np.lib.format.open_memmap(_last_npy(_run(downloads, "mixed")), mode="r+")
    rows[2, 5] = np.nan
    rows.flush()
    return dict(strict=True)


def _broken_line_in_the_last_npy(downloads: Path, output: Path) -> dict:
    _replace_jsonl_line(_last_npy(_run(downloads, "mixed")), 3, '{"id": "x", "title": "y", "text": "unterminated}')
    return {}


def _a_gap(downloads: Path, output: Path) -> dict:
    sorted(_run(downloads, "mixed"), key=lambda path: int(path.stem.split("_")[-1]))[1].unlink()
    return {}


def _output_path_taken_mid_copy(downloads: Path, output: Path) -> dict:
    _run(downloads, "mixed")

    def take_the_output_path(progress: MergeProgress) -> None:
        if progress.rows_done > 3 * 25 and not output.exists():
            # A .pkl output must be a file, a bundle a directory: the publish fails.
            output.mkdir() if output.suffix == ".pkl" else output.touch()
    return dict(on_progress=take_the_output_path)


def _ctrl_c_mid_copy(downloads: Path, output: Path) -> dict:
    _run(downloads, "mixed")

    def interrupt(progress: MergeProgress) -> None:
        if progress.rows_done > 3 * 25:
            raise KeyboardInterrupt
    return dict(on_progress=interrupt)


def _completes(downloads: Path, output: Path) -> dict:
    _run(downloads, "mixed")
    return {}


_ENDINGS = {
    "success": (_completes, None),
    "validation-error-before-the-copy": (_a_gap, MergeValidationError),
    "validation-error-mid-copy": (_nan_in_the_last_npy, MergeValidationError),
    "broken-jsonl-line": (_broken_line_in_the_last_npy, CheckpointError),
    "output-error-at-the-publish": (_output_path_taken_mid_copy, OutputError),
    "ctrl-c": (_ctrl_c_mid_copy, KeyboardInterrupt),
}


@pytest.mark.parametrize("ending", list(_ENDINGS))
@pytest.mark.parametrize(("output_name", "articles_format"), _OUTPUT_FORMS)
def test_a_merge_leaves_no_thread_and_no_process_behind(
    tmp_path: Path, ending: str, output_name: str, articles_format: str | None
) -> None:
    """Every hashing thread and the article worker end with the merge, however it ends."""
    prepare, raises = _ENDINGS[ending]
    output = tmp_path / "out" / output_name
    options = prepare(tmp_path / "downloads", output)
    threads, children = set(threading.enumerate()), _child_pids()

    # The error is kept, as a caller that reports it does: no lifetime may
    # hang on the garbage collector's taking the traceback's frames.
    with pytest.raises(raises) if raises else contextlib.nullcontext() as caught:
        merge_checkpoints(tmp_path / "downloads", output, articles_format=articles_format, **options)

    # New ones only: a thread that some earlier test left may end meanwhile.
    assert set(threading.enumerate()) - threads == set()
    assert _child_pids() - children == set() and multiprocessing.active_children() == []
    del caught


_FULL_DISK_MERGE_COUNTING_THREADS = """
import resource, signal, sys, threading
from async_embed_sync.errors import LocalFileError
from async_embed_sync.merging.merge import merge_checkpoints

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk gives ENOSPC
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
threads = set(threading.enumerate())
try:
    merge_checkpoints(sys.argv[1], sys.argv[2], articles_format="jsonl")
except LocalFileError as exc:
    print(exc, file=sys.stderr)
    print(len(set(threading.enumerate()) - threads))
"""


def test_a_full_disk_when_the_output_is_preallocated_leaves_no_thread_behind(tmp_path: Path) -> None:
    generate_run(tmp_path / "downloads", rows=2000, dim=256, fmt="npy")  # 2 MB of rows: over the limit
    output = tmp_path / "out" / "merged"

    finished = _merge_in_a_child(_FULL_DISK_MERGE_COUNTING_THREADS, tmp_path / "downloads", output)

    assert f"Cannot write {output}: File too large" in finished.stderr, finished.stderr
    assert finished.stdout == "0\n"  # new threads left
    assert entries(tmp_path / "out") == []
