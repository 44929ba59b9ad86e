"""A merged result's numbers, per checkpoint and across them, in one streaming pass and one sample.

The pass reads the result's rows in blocks, checkpoint by checkpoint (a
checkpoint's articles are one run of rows, in ``chunk_info`` order):
NaN/Inf, zero-norm rows and norm statistics per checkpoint, every row's
hash (on disk, with its row number, to find which rows repeat which), a
few norms of each checkpoint for the plots, and the nearest neighbours of a
few query rows over the whole result. The sample (``sample`` rows drawn
at random) is read once, for what needs all its pairs. Memory: one block,
the sample, and one bucket of hashes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..merging.metrics import QualityMetrics, RowHashBuckets, RowHasher

_BLOCK_BYTES = 8 << 20
_NORMS_KEPT = 2_000  # of each checkpoint, for its norm distribution
QUERIES = 5  # articles whose nearest neighbours the page lists
APART = 10  # a checkpoint's direction distance past which it stands out
NEIGHBOURS = 5


@dataclass
class CheckpointStatistics:
    """One checkpoint's rows of the result: where they are, and what they hold."""

    file: str
    cluster: str
    gpu_id: Any
    hostname: Any
    start_index: int
    end_index: int
    first_row: int  # in the result
    rows: int  # articles kept
    nan_values: int = 0
    inf_values: int = 0
    zero_norm_rows: int = 0
    norm_mean: float | None = None
    norm_std: float | None = None
    duplicate_rows: int = 0  # its rows that repeat an earlier row of the result
    # How far the mean direction of its sample rows is from the other sample rows', in units of
    # what chance gives for samples of one distribution (about 1; None: too few sample rows).
    direction_distance: float | None = None
    norms: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    flags: list[str] = field(default_factory=list)


@dataclass
class ResultStatistics:
    checkpoints: list[CheckpointStatistics]
    rows: int
    dim: int
    dtype: str
    sample_rows: np.ndarray  # the sample's row numbers, ascending
    sample: np.ndarray  # their unit vectors (float32; a zero or non-finite row stays as it was)
    sample_checkpoint: np.ndarray  # the checkpoint (index) of each sample row
    random_pair_similarity: np.ndarray
    nearest_similarity: np.ndarray  # of each sample row to its nearest other sample row
    queries: np.ndarray  # rows whose neighbours are listed
    neighbours: np.ndarray  # (queries, NEIGHBOURS) rows, nearest first, the query itself left out
    neighbour_scores: np.ndarray
    duplicate_rows: int = 0
    duplicate_examples: list[tuple[int, int]] = field(default_factory=list)  # (row, the earlier row it repeats)


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        unit = np.where((norms > 0) & np.isfinite(norms), vectors / norms, 0)
    return np.nan_to_num(unit, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)


def _checkpoints(chunk_info: Sequence[Mapping[str, Any]]) -> list[CheckpointStatistics]:
    first, found = 0, []
    for chunk in chunk_info:
        found.append(CheckpointStatistics(
            file=chunk["file"], cluster=chunk["cluster"], gpu_id=chunk.get("gpu_id"), hostname=chunk.get("hostname"),
            start_index=chunk["start_index"], end_index=chunk["end_index"], first_row=first,
            rows=chunk["articles_kept"]))
        first += chunk["articles_kept"]
    return found


def measure(result: Mapping[str, Any], sample: int = 2_000, seed: int = 0,
            on_rows: Callable[[int, int], None] | None = None) -> ResultStatistics:
    """The statistics of a merged ``result`` (as ``load()`` returns it), with a sample of ``sample`` rows;
    ``on_rows(done, total)`` after each block read."""
    embeddings = result["embeddings"]
    rows, dim = len(embeddings), embeddings.shape[1]
    checkpoints = _checkpoints(result["chunk_info"])
    rng = np.random.default_rng(seed)
    sample_rows = np.sort(rng.choice(rows, size=min(sample, rows), replace=False)) if rows else np.empty(0, np.int64)
    queries = sample_rows[np.sort(rng.choice(len(sample_rows), size=min(QUERIES, len(sample_rows)), replace=False))] \
        if len(sample_rows) else np.empty(0, np.int64)
    query_vectors = _unit(embeddings[queries]) if len(queries) else np.empty((0, dim), np.float32)
    best_rows = np.full((len(queries), NEIGHBOURS), -1, np.int64)
    best_scores = np.full((len(queries), NEIGHBOURS), -np.inf, np.float32)
    row_bytes = dim * np.dtype(embeddings.dtype).itemsize
    hasher = RowHasher(row_bytes)
    block_rows = max(1, _BLOCK_BYTES // max(1, dim * 4))
    with tempfile.TemporaryDirectory(prefix="async_embed_sync_report_") as scratch:
        hashes = RowHashBuckets(Path(scratch) / "hashes", columns=3)
        for checkpoint in checkpoints:
            metrics = QualityMetrics(row_bytes, count_duplicates=False)
            step = max(1, -(-checkpoint.rows // _NORMS_KEPT))
            kept_norms = []
            end = checkpoint.first_row + checkpoint.rows
            for first in range(checkpoint.first_row, end, block_rows):
                block = np.ascontiguousarray(embeddings[first : min(end, first + block_rows)])
                metrics.add_rows(block)
                row_numbers = np.arange(first, first + len(block), dtype=np.uint64)
                hashes.add(np.column_stack([hasher.hash_rows(block), row_numbers]))
                wide = block.astype(np.float32)
                kept = (row_numbers.astype(np.int64) - checkpoint.first_row) % step == 0
                kept_norms.append(np.linalg.norm(wide[kept], axis=1))
                if len(queries):
                    _keep_nearest(query_vectors, queries, _unit(wide), first, best_rows, best_scores)
                if on_rows is not None:
                    on_rows(first + len(block), rows)
            numbers = metrics.result()
            checkpoint.nan_values, checkpoint.inf_values = numbers["nan_values"], numbers["inf_values"]
            checkpoint.zero_norm_rows = numbers["zero_norm_rows"]
            checkpoint.norm_mean, checkpoint.norm_std = numbers["norm_mean"], numbers["norm_std"]
            checkpoint.norms = np.concatenate(kept_norms) if kept_norms else np.empty(0, np.float32)
        repeated, earlier = _repeats(hashes)
        hashes.remove()
    starts = np.array([checkpoint.first_row for checkpoint in checkpoints], np.int64)
    for index, count in zip(*np.unique(np.searchsorted(starts, repeated, side="right") - 1, return_counts=True)):
        checkpoints[index].duplicate_rows = int(count)
    unit_sample = _unit(embeddings[sample_rows]) if len(sample_rows) else np.empty((0, dim), np.float32)
    sample_checkpoint = np.searchsorted(starts, sample_rows, side="right") - 1 if len(starts) else sample_rows
    random_pairs, nearest = _similarities(unit_sample, rng)
    _direction_distances(unit_sample, sample_checkpoint, checkpoints)
    order = np.argsort(repeated, kind="stable")[:5]
    return ResultStatistics(
        checkpoints=checkpoints, rows=rows, dim=dim, dtype=np.dtype(embeddings.dtype).name, sample_rows=sample_rows,
        sample=unit_sample, sample_checkpoint=sample_checkpoint, random_pair_similarity=random_pairs,
        nearest_similarity=nearest, queries=queries, neighbours=best_rows, neighbour_scores=best_scores,
        duplicate_rows=len(repeated), duplicate_examples=[(int(repeated[i]), int(earlier[i])) for i in order],
    )


def _repeats(hashes: RowHashBuckets) -> tuple[np.ndarray, np.ndarray]:
    repeated, earlier = [], []
    for rows, firsts in hashes.repeats():
        repeated.append(rows)
        earlier.append(firsts)
    if not repeated:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(repeated), np.concatenate(earlier)


def _keep_nearest(queries: np.ndarray, query_rows: np.ndarray, block: np.ndarray, first: int,
                  best_rows: np.ndarray, best_scores: np.ndarray) -> None:
    scores = queries @ block.T  # (queries, block rows)
    numbers = np.arange(first, first + len(block))
    scores[query_rows[:, None] == numbers[None, :]] = -np.inf  # not its own neighbour
    rows = np.broadcast_to(numbers, scores.shape)
    all_scores = np.concatenate([best_scores, scores], axis=1)
    all_rows = np.concatenate([best_rows, rows], axis=1)
    top = np.argsort(-all_scores, axis=1, kind="stable")[:, : best_rows.shape[1]]
    best_scores[:] = np.take_along_axis(all_scores, top, axis=1)
    best_rows[:] = np.take_along_axis(all_rows, top, axis=1)


def _similarities(unit: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if len(unit) < 2:
        return np.empty(0, np.float32), np.empty(0, np.float32)
    left, right = rng.integers(0, len(unit), size=(2, 4 * len(unit)))
    distinct = left != right
    random_pairs = np.einsum("ij,ij->i", unit[left[distinct]], unit[right[distinct]])
    scores = unit @ unit.T
    np.fill_diagonal(scores, -np.inf)
    return random_pairs.astype(np.float32), scores.max(axis=1).astype(np.float32)


def _direction_distances(unit: np.ndarray, owner: np.ndarray, checkpoints: list[CheckpointStatistics]) -> None:
    """Each checkpoint's sample rows: the squared distance between their mean and the other rows' mean,
    over what it would be by chance, (1/n + 1/m) times the sample's spread about its mean.

    Samples of one distribution give about 1, whatever the embedding
    space's own mean direction; vectors of another model or precision,
    or of another part of a corpus sorted by topic, give far more.
    """
    finite = np.linalg.norm(unit, axis=1) > 0
    if finite.sum() < 4:
        return
    spread = float(((unit[finite] - unit[finite].mean(axis=0)) ** 2).sum(axis=1).mean())
    for index, checkpoint in enumerate(checkpoints):
        mine, others = finite & (owner == index), finite & (owner != index)
        if mine.sum() < 2 or others.sum() < 2 or spread == 0:
            continue
        gap = unit[mine].mean(axis=0) - unit[others].mean(axis=0)
        chance = (1 / mine.sum() + 1 / others.sum()) * spread
        checkpoint.direction_distance = float(gap @ gap / chance)


def _others_median(values: Sequence[float | None], index: int) -> float | None:
    others = [value for at, value in enumerate(values) if at != index and value is not None]
    return float(np.median(others)) if others else None


def flag_outliers(statistics: ResultStatistics) -> None:
    """Say, in each checkpoint's ``flags``, how it differs from the others (compared with their median).

    A checkpoint stands out with any NaN or Inf; with a share of zero-norm
    rows or of repeated rows more than a point above the others'; with a
    mean norm more than 10 % from theirs; or with sample rows whose mean
    direction is more than :data:`APART` times farther from the others' than
    chance puts it (and than the others' own distances).
    """
    checkpoints = statistics.checkpoints
    zero_share = [c.zero_norm_rows / c.rows if c.rows else 0.0 for c in checkpoints]
    repeat_share = [c.duplicate_rows / c.rows if c.rows else 0.0 for c in checkpoints]
    norm_means = [c.norm_mean for c in checkpoints]
    for index, checkpoint in enumerate(checkpoints):
        flags = checkpoint.flags
        if checkpoint.nan_values or checkpoint.inf_values:
            flags.append(f"{checkpoint.nan_values:,} NaN and {checkpoint.inf_values:,} Inf values")
        if len(checkpoints) < 2:
            continue
        others = _others_median(zero_share, index) or 0.0
        if zero_share[index] > others + 0.01:
            flags.append(f"{zero_share[index]:.1%} of its rows have zero norm (the others: {others:.1%})")
        others = _others_median(repeat_share, index) or 0.0
        if repeat_share[index] > others + 0.01:
            flags.append(f"{repeat_share[index]:.1%} of its rows repeat earlier rows (the others: {others:.1%})")
        others = _others_median(norm_means, index)
        mine = norm_means[index]
        if mine is not None and others and abs(mine - others) > 0.1 * others:
            flags.append(f"its mean L2 norm is {mine:.4g}, {mine / others:.2f} times the others' ({others:.4g})")
        distance = checkpoint.direction_distance
        # Against the others' distances too: one checkpoint far off moves the mean they are measured from.
        usual = _others_median([c.direction_distance for c in checkpoints], index) or 1.0
        if distance is not None and distance > APART * max(1.0, usual):
            flags.append(f"its vectors lie apart: their mean direction is {distance:,.0f} times farther from the "
                         f"others' than chance puts it (another model, precision, or part of the corpus?)")
