from __future__ import annotations

import numpy as np
import pytest

from async_embed_sync.merging.metrics import QualityMetrics, RowHashBuckets, RowHasher


def _sample() -> np.ndarray:
    rows = np.random.default_rng(5).standard_normal((300, 12)).astype(np.float32)
    rows[3] = 0.0
    rows[10, 2] = np.nan
    rows[11, 0] = np.inf
    rows[11, 1] = -np.inf
    rows[50] = rows[40]
    rows[51] = rows[40]
    rows[60] = rows[3]
    return rows


def _accumulate(rows: np.ndarray, block_rows: int) -> dict:
    metrics = QualityMetrics(row_bytes=rows.shape[1] * rows.dtype.itemsize)
    for first in range(0, len(rows), block_rows):
        metrics.add_rows(rows[first : first + block_rows])
    metrics.add_dropped(7)
    return metrics.result()


@pytest.mark.parametrize("block_rows", [1, 13, 300])
def test_counts_do_not_depend_on_block_size(block_rows: int) -> None:
    result = _accumulate(_sample(), block_rows)

    assert result["rows"] == 300
    assert result["dropped_non_article_rows"] == 7
    assert (result["nan_values"], result["inf_values"], result["nonfinite_rows"]) == (1, 2, 2)
    assert result["zero_norm_rows"] == 2
    assert result["duplicate_rows"] == 3


@pytest.mark.parametrize("block_rows", [1, 7, 300])
def test_norm_statistics_match_numpy_over_finite_rows(block_rows: int) -> None:
    rows = _sample()
    finite = rows[np.isfinite(rows).all(axis=1)].astype(np.float64)
    norms = np.linalg.norm(finite, axis=1)

    result = _accumulate(rows, block_rows)

    assert result["norm_min"] == 0.0
    assert result["norm_max"] == pytest.approx(norms.max(), rel=1e-6)
    assert result["norm_mean"] == pytest.approx(norms.mean(), rel=1e-6)
    assert result["norm_std"] == pytest.approx(norms.std(), rel=1e-5)


def test_results_are_plain_python_numbers() -> None:
    result = _accumulate(_sample(), 50)

    assert all(type(value) in (int, float) for value in result.values())


def test_no_finite_row_gives_no_norm_statistics() -> None:
    metrics = QualityMetrics(row_bytes=8)
    metrics.add_rows(np.full((2, 2), np.nan, dtype=np.float32))

    result = metrics.result()
    assert result["norm_mean"] is None and result["nonfinite_rows"] == 2 and result["nan_values"] == 4


def test_float16_squares_do_not_overflow() -> None:
    metrics = QualityMetrics(row_bytes=8)
    metrics.add_rows(np.full((1, 4), 300.0, dtype=np.float16))

    assert metrics.result()["norm_max"] == pytest.approx(600.0)
    assert metrics.result()["inf_values"] == 0


def test_rows_differing_only_in_the_high_halves_of_words_differ() -> None:
    # Flipping the sign of two float32s that sit in the high halves of two
    # 64-bit words changes both words by 2**63: the aligned reading alone
    # cannot tell these rows apart.
    rows = np.ones((2, 4), dtype=np.float32)
    rows[1, 1] = rows[1, 3] = -1.0

    hashes = RowHasher(16).hash_rows(rows)

    assert hashes[0, 0] == hashes[1, 0]
    assert hashes[0, 1] != hashes[1, 1]


def test_hashes_cover_rows_whose_size_is_not_a_multiple_of_eight() -> None:
    rows = np.zeros((2, 3), dtype=np.float32)
    rows[1, 2] = 1.0

    hashes = RowHasher(12).hash_rows(rows)

    assert tuple(hashes[0]) != tuple(hashes[1])


_NORM_KEYS = ("norm_min", "norm_mean", "norm_max", "norm_std")


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_absorbed_parts_count_as_one_accumulator(order: list[int]) -> None:
    rows = _sample()
    whole = _accumulate(rows, 300)
    # Duplicates (rows 40, 50, 51 and 3, 60) and non-finite rows fall into different parts.
    bounds = [0, 45, 55, 200, 300]
    parts = []
    for first, last in zip(bounds, bounds[1:]):
        part = QualityMetrics(row_bytes=rows.shape[1] * rows.dtype.itemsize)
        part.add_rows(rows[first:last])
        parts.append(part)
    parts[2].add_dropped(7)
    combined = QualityMetrics(row_bytes=rows.shape[1] * rows.dtype.itemsize)

    for index in order:
        combined.absorb(parts[index])

    result = combined.result()
    assert {key: result[key] for key in result if key not in _NORM_KEYS} == {
        key: whole[key] for key in whole if key not in _NORM_KEYS
    }
    for key in _NORM_KEYS:
        assert result[key] == pytest.approx(whole[key], rel=1e-12)


@pytest.mark.parametrize("pending_rows", [1, 7, 1 << 20])
def test_duplicates_counted_in_buckets_on_disk_equal_those_counted_in_memory(tmp_path, pending_rows: int) -> None:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 4, size=(3000, 5)).astype(np.float32)  # few distinct values: many repeats
    expected = len(rows) - len(np.unique(rows, axis=0))
    buckets = RowHashBuckets(tmp_path / "hashes")
    buckets.PENDING_ROWS = pending_rows  # flushed after every block, or once at the end
    total = QualityMetrics(row_bytes=20, hashes=buckets)
    in_memory = QualityMetrics(row_bytes=20)
    for part in np.array_split(rows, 9):
        checkpoint = QualityMetrics(row_bytes=20, hashes=buckets)
        checkpoint.add_rows(part)
        total.absorb(checkpoint)
        in_memory.add_rows(part)

    assert total.rows == 3000 and total.duplicate_rows() == in_memory.duplicate_rows() == expected > 0
    assert 1 < len(list((tmp_path / "hashes").iterdir())) <= RowHashBuckets.BUCKETS
    buckets.remove()
    assert not (tmp_path / "hashes").exists()
