"""Quality metrics of merged embeddings, accumulated block by block.

Memory stays bounded whatever the number of rows: norm statistics are
running sums merged with Chan et al.'s parallel update (numerically sound for
mean and variance), and duplicate detection keeps 16 bytes per row, on disk
in buckets during a merge (:class:`RowHashBuckets`), so that counting
needs one bucket in memory at a time.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# Rows are hashed this many at a time, so the integer temporaries stay in cache.
_HASH_BATCH_ROWS = 512


class RowHasher:
    """Two 64-bit multilinear hashes of each row's bytes, 16 bytes per row.

    The first hash reads the row as 64-bit words, the second as 64-bit words
    shifted by four bytes, so that a difference confined to the high half of
    the words of one reading sits in the low half in the other, where the
    multiply-and-add hash is strong. Equal rows always hash equal; different
    rows collide with a probability of about 2**-64 for typical data (never
    above about 2**-32), so the duplicate count needs no second look at the data.
    """

    def __init__(self, row_bytes: int, seed: int = 0x5EED):
        self.row_bytes = row_bytes
        self._padded_bytes = -(-row_bytes // 8) * 8 + 8
        words = self._padded_bytes // 8
        rng = np.random.default_rng(seed)
        # Odd multipliers: a difference in a single word always changes the hash.
        self._aligned = rng.integers(0, 2**63, size=words, dtype=np.uint64) * 2 + 1
        self._shifted = rng.integers(0, 2**63, size=words - 1, dtype=np.uint64) * 2 + 1

    def hash_rows(self, rows: np.ndarray) -> np.ndarray:
        """``(n, 2)`` uint64 hashes of the rows of a 2-D array."""
        hashes = np.empty((len(rows), 2), dtype=np.uint64)
        if self.row_bytes % 8 == 0 and self.row_bytes >= 16 and rows.flags.c_contiguous:
            # Rows that are whole words: both readings are views of the rows
            # themselves, hashed by one integer matrix-vector product each
            # (uint64 products wrap, as the sum below does), with no padded copy.
            raw = rows.view(np.uint8).reshape(len(rows), self.row_bytes)
            words = self.row_bytes // 8
            np.matmul(raw.view(np.uint64), self._aligned[:words], out=hashes[:, 0])
            np.matmul(raw[:, 4:-4].view(np.uint64), self._shifted[: words - 1], out=hashes[:, 1])
            return hashes
        padded = np.zeros((min(len(rows), _HASH_BATCH_ROWS), self._padded_bytes), dtype=np.uint8)
        for first in range(0, len(rows), _HASH_BATCH_ROWS):
            batch = rows[first : first + _HASH_BATCH_ROWS]
            raw = padded[: len(batch)]
            raw[:, : self.row_bytes] = np.ascontiguousarray(batch).view(np.uint8).reshape(len(batch), -1)
            out = hashes[first : first + len(batch)]
            self._multilinear(raw.view(np.uint64), self._aligned, out[:, 0])
            self._multilinear(raw[:, 4:-4].view(np.uint64), self._shifted, out[:, 1])
        return hashes

    @staticmethod
    def _multilinear(words: np.ndarray, coefficients: np.ndarray, out: np.ndarray) -> None:
        # uint64 arithmetic wraps: the sum of products is taken modulo 2**64.
        np.multiply(words, coefficients, out=np.empty(words.shape, np.uint64)).sum(axis=1, out=out)


def _count_duplicates(hashes: np.ndarray) -> int:
    """Rows of ``(n, 2)`` ``hashes`` that repeat an earlier one."""
    # Sorting one column is several times faster than unique() over row
    # pairs; only rows whose first hash repeats need the second one.
    first = np.sort(hashes[:, 0])
    repeats = np.unique(first[1:][first[1:] == first[:-1]])
    candidates = hashes[np.isin(hashes[:, 0], repeats)]
    return int(len(candidates) - len(np.unique(candidates, axis=0)))


class RowHashBuckets:
    """Row hashes in :data:`BUCKETS` files in ``directory``, by the top bits of the first hash.

    Equal rows land in the same bucket, so duplicates are counted a bucket at
    a time: memory holds one bucket (1/64 of the rows' 16 bytes) and up to
    :data:`PENDING_ROWS` hashes waiting to be written.
    """

    BUCKETS = 64
    PENDING_ROWS = 1 << 16

    def __init__(self, directory: Path, columns: int = 2):
        # columns: the two hashes, and (3) the row number, for repeats().
        self.directory = directory
        self.columns = columns
        directory.mkdir()
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def _path(self, bucket: int) -> Path:
        return self.directory / f"{bucket:02d}.hashes"

    def add(self, hashes: np.ndarray) -> None:
        self._pending.append(hashes)
        self._pending_rows += len(hashes)
        if self._pending_rows >= self.PENDING_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        hashes = np.concatenate(self._pending)
        self._pending, self._pending_rows = [], 0
        buckets = (hashes[:, 0] >> np.uint64(58)).astype(np.intp)
        order = np.argsort(buckets, kind="stable")
        ends = np.cumsum(np.bincount(buckets, minlength=self.BUCKETS))
        hashes = hashes[order]
        start = 0
        for bucket, end in enumerate(ends.tolist()):
            if end > start:
                with open(self._path(bucket), "ab") as stream:
                    stream.write(hashes[start:end].tobytes())
            start = end

    def _buckets(self) -> Iterator[np.ndarray]:
        self._flush()
        for bucket in range(self.BUCKETS):
            if self._path(bucket).exists():
                yield np.fromfile(self._path(bucket), dtype=np.uint64).reshape(-1, self.columns)

    def duplicates(self) -> int:
        return sum(_count_duplicates(hashes[:, :2]) for hashes in self._buckets())

    def repeats(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per bucket, each row that repeats an earlier row, and the first row it repeats (``columns=3``)."""
        for entries in self._buckets():
            entries = entries[np.lexsort((entries[:, 2], entries[:, 1], entries[:, 0]))]
            same = (entries[1:, 0] == entries[:-1, 0]) & (entries[1:, 1] == entries[:-1, 1])
            starts_group = np.concatenate([[True], ~same])
            first = entries[np.flatnonzero(starts_group)[np.cumsum(starts_group) - 1], 2]
            yield entries[~starts_group, 2].astype(np.int64), first[~starts_group].astype(np.int64)

    def remove(self) -> None:
        self._pending = []
        shutil.rmtree(self.directory, ignore_errors=True)


class QualityMetrics:
    """Accumulates NaN/Inf counts, norms and duplicates over the merged rows.

    With ``hashes``, the rows' hashes go there as they come (metrics that
    share it count their duplicates together); else they are kept here,
    unless ``count_duplicates`` is False (whoever counts them elsewhere).
    """

    def __init__(self, row_bytes: int, hashes: RowHashBuckets | None = None, count_duplicates: bool = True):
        self.rows = 0
        self.dropped_rows = 0
        self.nan_values = 0
        self.inf_values = 0
        self.nonfinite_rows = 0
        self.zero_norm_rows = 0
        self._norm_count = 0
        self._norm_mean = 0.0
        self._norm_m2 = 0.0
        self._norm_min = math.inf
        self._norm_max = -math.inf
        self._hasher = RowHasher(row_bytes)
        self._hash_blocks: list[np.ndarray] = []
        self._hash_buckets = hashes
        self._count_duplicates = count_duplicates

    def add_dropped(self, count: int) -> None:
        """Rows that were not articles and were left out of the output."""
        self.dropped_rows += count

    def add_rows(self, block: np.ndarray) -> None:
        """Account for a block of output rows, in the output dtype."""
        if not len(block):
            return
        self.rows += len(block)
        # float32 accumulation over one row is precise enough and 4x faster
        # than float64; float16 rows are widened so that squares cannot overflow.
        accumulate = np.promote_types(block.dtype, np.float32)
        squares = np.einsum("ij,ij->i", block, block, dtype=accumulate)
        # A NaN or an Inf anywhere in a row makes its sum of squares non-finite,
        # so one pass over the block usually settles both questions.
        if np.isfinite(squares).all():
            self._add_squares(squares)
        else:
            self._add_rows_with_nonfinite_sums(block, accumulate)
        if self._count_duplicates:
            self._keep_hashes(self._hasher.hash_rows(block))

    def _keep_hashes(self, hashes: np.ndarray) -> None:
        if self._hash_buckets is not None:
            self._hash_buckets.add(hashes)
        else:
            self._hash_blocks.append(hashes)

    def _add_rows_with_nonfinite_sums(self, block: np.ndarray, accumulate: np.dtype) -> None:
        # Rare path: NaN or Inf values, or finite values whose squares overflow.
        finite_rows = np.isfinite(block).all(axis=1)
        finite = block
        if not finite_rows.all():
            # Rare path: only blocks with a NaN or an Inf pay for counting them.
            self.nan_values += int(np.isnan(block).sum())
            self.inf_values += int(np.isinf(block).sum())
            self.nonfinite_rows += int(len(block) - finite_rows.sum())
            finite = block[finite_rows]
        self._add_squares(np.einsum("ij,ij->i", finite, finite, dtype=accumulate))

    def _add_squares(self, squares: np.ndarray) -> None:
        norms = np.sqrt(squares.astype(np.float64))
        self.zero_norm_rows += int((norms == 0).sum())
        self._add_norms(norms)

    def _add_norms(self, norms: np.ndarray) -> None:
        if not len(norms):
            return
        mean = float(norms.mean())
        m2 = float(((norms - mean) ** 2).sum())
        self._merge_norm_statistics(len(norms), mean, m2, float(norms.min()), float(norms.max()))

    def _merge_norm_statistics(self, count: int, mean: float, m2: float, low: float, high: float) -> None:
        # Chan et al.'s update: the statistics of the union of two sets of norms.
        if not count:
            return
        total = self._norm_count + count
        delta = mean - self._norm_mean
        self._norm_mean += delta * count / total
        self._norm_m2 += m2 + delta * delta * self._norm_count * count / total
        self._norm_count = total
        self._norm_min = min(self._norm_min, low)
        self._norm_max = max(self._norm_max, high)

    def absorb(self, other: QualityMetrics) -> None:
        """Add what ``other`` accumulated (rows of the same width), as if its rows came after these.

        The counts and the duplicate count do not depend on the order in
        which parts are absorbed; the norm mean and spread may differ in their
        last bits, so a merge absorbs its checkpoints' parts in index order
        whatever order it read them in.
        """
        self.rows += other.rows
        self.dropped_rows += other.dropped_rows
        self.nan_values += other.nan_values
        self.inf_values += other.inf_values
        self.nonfinite_rows += other.nonfinite_rows
        self.zero_norm_rows += other.zero_norm_rows
        self._merge_norm_statistics(
            other._norm_count, other._norm_mean, other._norm_m2, other._norm_min, other._norm_max
        )
        if other._hash_buckets is None:  # its hashes are in memory
            for block in other._hash_blocks:
                self._keep_hashes(block)
        elif other._hash_buckets is not self._hash_buckets:
            raise ValueError("the metrics keep their row hashes in different buckets")

    def duplicate_rows(self) -> int:
        """Rows that repeat an earlier row byte for byte (of these rows and those of metrics sharing their hashes)."""
        if self._hash_buckets is not None:
            return self._hash_buckets.duplicates()
        if not self._hash_blocks:
            return 0
        hashes = np.concatenate(self._hash_blocks)
        self._hash_blocks = [hashes]
        return _count_duplicates(hashes)

    def result(self) -> dict[str, int | float | None]:
        """Plain Python numbers, as ``quality_metrics`` holds them.

        Norm statistics cover finite rows only; they are None when there is none.
        """
        has_norms = self._norm_count > 0
        return {
            "rows": self.rows,
            "dropped_non_article_rows": self.dropped_rows,
            "nan_values": self.nan_values,
            "inf_values": self.inf_values,
            "nonfinite_rows": self.nonfinite_rows,
            "zero_norm_rows": self.zero_norm_rows,
            "duplicate_rows": self.duplicate_rows(),
            "norm_min": self._norm_min if has_norms else None,
            "norm_mean": self._norm_mean if has_norms else None,
            "norm_max": self._norm_max if has_norms else None,
            "norm_std": math.sqrt(self._norm_m2 / self._norm_count) if has_norms else None,
        }
