from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from async_embed_sync.testing.synthetic import generate_run, make_vectors


def test_run_covers_every_index_once_across_clusters_and_gpus(tmp_path: Path) -> None:
    paths = generate_run(tmp_path, rows=100, dim=8, files_per_gpu=2)

    assert len(paths) == 2 * 4 * 2
    assert {path.parent.name for path in paths} == {"tensor01", "tensor02"}
    ranges = [tuple(int(part) for part in path.stem.split("_")[-2:]) for path in paths]
    assert ranges[0][0] == 0 and ranges[-1][1] == 100
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    assert paths[0].name == "embeddings_gpu0_00000000_00000006.pkl"


def test_npy_form_writes_array_sidecar_and_rows(tmp_path: Path) -> None:
    (path,) = generate_run(tmp_path, rows=20, dim=8, clusters=("c",), gpus_per_cluster=1, fmt="npy")

    sidecar = json.loads(path.with_suffix(".json").read_text())
    lines = path.with_suffix(".jsonl").read_text().splitlines()
    assert np.load(path).shape == (20, 8)
    assert sidecar["start_index"] == 0 and sidecar["end_index"] == 20
    assert sidecar["articles_file"] == path.with_suffix(".jsonl").name
    assert len(lines) == 20


def test_mixed_alternates_formats(tmp_path: Path) -> None:
    paths = generate_run(tmp_path, rows=40, dim=8, fmt="mixed")

    assert [path.suffix for path in paths[:4]] == [".pkl", ".npy", ".pkl", ".npy"]


def test_rows_do_not_depend_on_how_the_run_is_split() -> None:
    whole = make_vectors(0, 3000, dim=8, seed=3)

    assert np.array_equal(make_vectors(1000, 2500, dim=8, seed=3), whole[1000:2500])
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-6)
    assert not np.array_equal(make_vectors(0, 10, dim=8, seed=4), whole[:10])


@pytest.mark.parametrize("questions_at", [None, {0, 17, 18}])
def test_questions_are_last_by_default_or_where_asked(tmp_path: Path, questions_at: set[int] | None) -> None:
    paths = generate_run(
        tmp_path, rows=50, dim=8, fmt="npy", questions=10, question_indices=questions_at, text_bytes=100
    )
    rows = [json.loads(line) for path in paths for line in path.with_suffix(".jsonl").read_text().splitlines()]

    expected = questions_at if questions_at is not None else set(range(40, 50))
    assert {index for index, row in enumerate(rows) if row.get("kind") == "question"} == expected
    article = next(row for index, row in enumerate(rows) if index not in expected)
    assert set(article) == {"id", "title", "url", "text"} and len(article["text"]) == 100
