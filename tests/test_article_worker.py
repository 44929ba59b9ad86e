"""The article worker process: every line parsed, the first problem reported by name, metadata shards written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from async_embed_sync.errors import CheckpointError, OutputError
from async_embed_sync.merging.article_worker import ArticleWorker
from async_embed_sync.output.metadata_shards import BATCH_ROWS
from async_embed_sync.output.shards import ShardPlan


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


def test_metadata_shards_get_the_rows_of_every_span_in_order(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    first, first_size = _lines(tmp_path / "a.jsonl", '{"id": "0", "title": "a"}', '{"id": "1", "kind": "question"}',
                               '{"id": "2", "title": "c"}')
    second, second_size = _lines(tmp_path / "b.jsonl", '{"id": "3"}')
    skip = len('{"id": "0", "title": "a"}\n')
    question = len('{"id": "1", "kind": "question"}\n')
    (tmp_path / "metadata").mkdir()

    spans = [(first, [(0, skip, 1), (skip + question, first_size - skip - question, 3)]), (second, [(0, second_size, 1)])]

    with ArticleWorker() as worker:
        for path, path_spans in spans:
            worker.survey(path, path_spans)
        worker.write_metadata(tmp_path, ShardPlan(rows=3, shard_rows=2), "parquet", group_rows=1)
        for path, path_spans in spans:
            worker.submit(path, path_spans)
        shards = worker.finish()

    paths = [tmp_path / "metadata" / "part-00000.parquet", tmp_path / "metadata" / "part-00001.parquet"]
    assert pq.read_table(paths[0]).to_pylist() == [{"row": 0, "id": "0", "title": "a"}, {"row": 1, "id": "2", "title": "c"}]
    assert pq.read_table(paths[1]).to_pylist() == [{"row": 2, "id": "3", "title": None}]
    assert pq.ParquetFile(paths[0]).num_row_groups == 2
    assert shards == [(2, hashlib.sha256(paths[0].read_bytes()).hexdigest()),
                      (1, hashlib.sha256(paths[1].read_bytes()).hexdigest())]


def test_parquet_columns_are_every_key_any_article_has(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    rows, size = _lines(tmp_path / "a.jsonl", *(f'{{"id": "{i}"}}' for i in range(BATCH_ROWS)),
                        '{"id": "x", "lang": "en", "score": 1}', '{"id": "y", "score": 2.5}')
    (tmp_path / "metadata").mkdir()

    with ArticleWorker() as worker:
        worker.survey(rows, [(0, size, 1)])
        worker.write_metadata(tmp_path, ShardPlan(rows=BATCH_ROWS + 2, shard_rows=10_000), "parquet", group_rows=100)
        worker.submit(rows, [(0, size, 1)])
        worker.finish()

    table = pq.read_table(tmp_path / "metadata" / "part-00000.parquet")
    assert table.column_names == ["row", "id", "lang", "score"]
    assert table.slice(BATCH_ROWS - 1).to_pylist() == [
        {"row": BATCH_ROWS - 1, "id": str(BATCH_ROWS - 1), "lang": None, "score": None},
        {"row": BATCH_ROWS, "id": "x", "lang": "en", "score": 1.0},  # ints beside floats: floats
        {"row": BATCH_ROWS + 1, "id": "y", "lang": None, "score": 2.5},
    ]


@pytest.mark.parametrize(
    "late_row, message",
    [
        # A parquet column holds one type: a key's values that share none are refused by name.
        ('{"id": 2}', r"a\.jsonl: the article key 'id' holds values of kinds that no one parquet column holds "
                      r"\(str first in .*a\.jsonl; int first in .*a\.jsonl: .*--articles-format jsonl"),
        ('{"id": "2", "meta": {"a": [1]}}', r"a\.jsonl: the article key 'meta' holds values of kinds .*\(dict first in"),
    ],
)
def test_keys_whose_values_share_no_parquet_type_are_refused_by_name(tmp_path: Path, late_row: str, message: str) -> None:
    pytest.importorskip("pyarrow.parquet")
    rows, size = _lines(tmp_path / "a.jsonl", '{"id": "0", "meta": {"a": "x"}}', '{"id": "1"}', late_row)
    (tmp_path / "metadata").mkdir()

    with ArticleWorker() as worker:
        worker.survey(rows, [(0, size, 1)])
        worker.write_metadata(tmp_path, ShardPlan(rows=3, shard_rows=10_000), "parquet", group_rows=2)
        worker.submit(rows, [(0, size, 1)])
        with pytest.raises(CheckpointError, match=message):
            worker.finish()


@pytest.mark.parametrize(("articles_format", "row"), [("parquet", '{"row": 5}'), ("jsonl", '{"id": "1", "row": 5}'),
                                                      ("parquet-embeddings", '{"embedding": [1]}')])
def test_a_key_the_metadata_keeps_for_itself_is_refused_by_name(tmp_path: Path, articles_format: str, row: str) -> None:
    rows, size = _lines(tmp_path / "a.jsonl", row)
    (tmp_path / "metadata").mkdir()
    (tmp_path / "embeddings").mkdir()
    np.save(tmp_path / "embeddings" / "part-00000.npy", np.zeros((1, 1), np.float32))
    key = json.loads(row).keys() - {"id"}

    with ArticleWorker() as worker:
        worker.survey(rows, [(0, size, 1)])
        worker.write_metadata(tmp_path, ShardPlan(rows=1, shard_rows=10), articles_format, group_rows=2)
        worker.submit(rows, [(0, size, 1)])
        with pytest.raises(CheckpointError, match=rf"a\.jsonl: its article rows have a '{key.pop()}' key"):
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
