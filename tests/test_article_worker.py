"""The article worker process: every line parsed, the first problem reported by name, parquet written."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from async_embed_sync.errors import CheckpointError, OutputError
from async_embed_sync.merging.article_worker import ArticleWorker


def _lines(path: Path, *rows: str) -> tuple[Path, int]:
    path.write_text("".join(f"{row}\n" for row in rows))
    return path, path.stat().st_size


def test_the_first_bad_line_is_reported_by_file_and_line_when_finishing(tmp_path: Path) -> None:
    good, good_size = _lines(tmp_path / "good.jsonl", '{"id": "0"}', '{"id": "1"}')
    bad, bad_size = _lines(tmp_path / "bad.jsonl", '{"id": "0"}', "[1]")
    later, later_size = _lines(tmp_path / "later.jsonl", "{")

    with ArticleWorker() as worker:
        worker.submit(good, [(0, good_size, 1)])
        worker.submit(bad, [(0, bad_size, 7)])
        worker.submit(later, [(0, later_size, 1)])  # after the first problem: read, not reported
        with pytest.raises(CheckpointError, match=f"{bad}: line 8 is not a JSON object"):
            worker.finish()
        worker.finish()  # once reported, finishing again returns at once


def test_problems_name_the_source_of_the_lines(tmp_path: Path) -> None:
    scratch, size = _lines(tmp_path / "articles.scratch", "not json")

    with ArticleWorker() as worker:
        worker.submit(scratch, [(0, size, 1)], source=tmp_path / "ckpt_0.pkl")
        with pytest.raises(CheckpointError, match=r"ckpt_0\.pkl: line 1 is not JSON"):
            worker.finish()


def test_parquet_gets_the_rows_of_every_span_in_order(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    first, first_size = _lines(tmp_path / "a.jsonl", '{"id": "0", "title": "a"}', '{"id": "1", "kind": "question"}',
                               '{"id": "2", "title": "c"}')
    second, second_size = _lines(tmp_path / "b.jsonl", '{"id": "3"}')
    skip = len('{"id": "0", "title": "a"}\n')
    question = len('{"id": "1", "kind": "question"}\n')

    with ArticleWorker() as worker:
        worker.write_parquet(tmp_path / "articles.parquet", group_rows=2)
        worker.submit(first, [(0, skip, 1), (skip + question, first_size - skip - question, 3)])
        worker.submit(second, [(0, second_size, 1)])
        worker.finish()

    table = pq.read_table(tmp_path / "articles.parquet")
    assert table.to_pylist() == [{"id": "0", "title": "a"}, {"id": "2", "title": "c"}, {"id": "3", "title": None}]
    assert pq.ParquetFile(tmp_path / "articles.parquet").num_row_groups == 2


@pytest.mark.parametrize(
    "late_row, message",
    [
        # A parquet file has one set of columns: a new key is refused, not dropped.
        ('{"id": "2", "lang": "en"}', r"a\.jsonl: .*keys \(lang\) that the first 2 rows .*--articles-format jsonl"),
        ('{"id": {"nested": 2}}', r"a\.jsonl: .*do not fit the parquet columns.*--articles-format jsonl"),
    ],
)
def test_rows_that_do_not_fit_the_parquet_columns_are_refused_by_name(tmp_path: Path, late_row: str, message: str) -> None:
    pytest.importorskip("pyarrow.parquet")
    rows, size = _lines(tmp_path / "a.jsonl", '{"id": "0"}', '{"id": "1"}', late_row)

    with ArticleWorker() as worker:
        worker.write_parquet(tmp_path / "articles.parquet", group_rows=2)
        worker.submit(rows, [(0, size, 1)])
        with pytest.raises(CheckpointError, match=message):
            worker.finish()


def test_a_worker_that_died_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with ArticleWorker() as worker:
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        with pytest.raises(OutputError, match="articles: the worker process that writes them ended unexpectedly"):
            worker.finish()


def test_leaving_early_stops_the_worker(tmp_path: Path) -> None:
    with ArticleWorker() as worker:
        process = worker.process
    # Stopped and reaped, not left running or as a zombie.
    assert process.returncode == -signal.SIGTERM


def test_the_worker_inherits_no_descriptor_but_its_pipe(tmp_path: Path) -> None:
    """Started afresh, not forked: a file, socket or pipe open here stays here."""
    held = tmp_path / "held-open"
    with open(held, "wb"), ArticleWorker() as worker:
        pid = worker.process.pid
        targets = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if int(fd) > 2:  # past stdin, stdout and stderr
                with contextlib.suppress(FileNotFoundError):  # one closed meanwhile, while it imports
                    targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        worker.finish()
    assert str(held) not in targets
    assert sum(target.startswith("socket:") for target in targets) == 1, targets  # its pipe
