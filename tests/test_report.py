"""The report: its numbers per checkpoint, computed here independently, and the checkpoints it flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from async_embed_sync import load
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.report.statistics import flag_outliers, measure
from async_embed_sync.testing.synthetic import generate_run

ROWS, DIM = 8_000, 32
SCALED, ZEROED, DUPLICATED, APART = 1, 3, 5, 6  # of the 8 checkpoints, in index order


def _vectors(path: Path) -> np.ndarray:
    return np.load(path)


@pytest.fixture(scope="module")
def odd_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """A run of 8 .npy checkpoints, 4 of them made odd; and every checkpoint's article rows as merged."""
    root = tmp_path_factory.mktemp("odd")
    paths = generate_run(root / "downloads", rows=ROWS, dim=DIM, fmt="npy", questions=0)
    vectors = [np.load(path) for path in paths]
    vectors[SCALED] = vectors[SCALED] * 3
    vectors[ZEROED][::5] = 0  # a fifth of its rows
    vectors[DUPLICATED][: len(vectors[DUPLICATED]) // 2] = vectors[0][: len(vectors[DUPLICATED]) // 2]
    shift = np.zeros(DIM, np.float32)
    shift[0] = 4.0
    apart = vectors[APART] + shift
    vectors[APART] = apart / np.linalg.norm(apart, axis=1, keepdims=True)
    for path, rows in zip(paths, vectors):
        np.save(path, rows.astype(np.float32))
    merge_checkpoints(root / "downloads", root / "bundle", shard_rows=3_000)
    return root / "bundle", vectors


def test_the_numbers_of_each_checkpoint_are_its_rows(odd_run) -> None:
    bundle, vectors = odd_run
    statistics = measure(load(bundle), sample=1_000)

    assert [c.rows for c in statistics.checkpoints] == [len(v) for v in vectors]
    seen: set[bytes] = set()
    for checkpoint, rows in zip(statistics.checkpoints, vectors):
        norms = np.linalg.norm(rows.astype(np.float64), axis=1)
        assert checkpoint.zero_norm_rows == int((norms == 0).sum())
        assert checkpoint.norm_mean == pytest.approx(norms.mean(), rel=1e-6)
        assert checkpoint.norm_std == pytest.approx(norms.std(), rel=1e-4, abs=1e-7)
        repeats = 0
        for row in rows:
            repeats += row.tobytes() in seen
            seen.add(row.tobytes())
        assert checkpoint.duplicate_rows == repeats, checkpoint.file
    assert statistics.duplicate_rows == sum(c.duplicate_rows for c in statistics.checkpoints) > 0


def test_exactly_the_odd_checkpoints_are_flagged_and_why(odd_run) -> None:
    bundle, _ = odd_run
    statistics = measure(load(bundle), sample=1_000)
    flag_outliers(statistics)

    flagged = {index: checkpoint.flags for index, checkpoint in enumerate(statistics.checkpoints) if checkpoint.flags}
    assert set(flagged) == {SCALED, ZEROED, DUPLICATED, APART}, flagged
    assert any("3.00 times the others'" in flag for flag in flagged[SCALED])
    assert any("20.0% of its rows have zero norm" in flag for flag in flagged[ZEROED])
    assert any("50.0% of its rows repeat earlier rows" in flag for flag in flagged[DUPLICATED])
    assert any("lie apart" in flag for flag in flagged[APART])


def test_the_nearest_neighbours_are_those_of_the_whole_result(odd_run) -> None:
    bundle, vectors = odd_run
    result = load(bundle)
    statistics = measure(result, sample=500)
    everything = np.concatenate(vectors).astype(np.float32)
    norms = np.linalg.norm(everything, axis=1, keepdims=True)
    unit = np.divide(everything, norms, out=np.zeros_like(everything), where=norms > 0)

    for query, found in zip(statistics.queries, statistics.neighbours):
        scores = unit @ unit[query]
        scores[query] = -np.inf
        assert np.allclose(scores[found], np.sort(scores)[::-1][: len(found)], atol=1e-5)
