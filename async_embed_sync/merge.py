"""Merge every checkpoint of a run into one result, validated and memory-bounded.

Three steps, in this order:

1. **Plan**: open each checkpoint in turn (one at a time) and keep its
   :class:`~.checkpoints.CheckpointInfo` (and, for a ``.npy`` checkpoint,
   the opened checkpoint itself: a map and the index of its lines).
2. **Validate** all of them together before anything is written: contiguous
   coverage of ``[0, N)`` from index 0, one dimension, one model, float
   dtypes, the expected article count.
3. **Copy**: preallocate the output, then copy checkpoint by checkpoint,
   block by block, keeping only article rows, converting the dtype,
   accumulating the quality metrics and hashing inputs and output (on
   worker threads) in the same pass; publish atomically (see ``output.py``).

Every ``.jsonl`` line is parsed before anything is published. Where the
output reads the rows as dicts, the copy parses them; where it copies them
verbatim (a bundle's ``articles.jsonl``), a worker process parses them from
the moment each file is indexed, beside the planning and the copy, and is
joined before the publish: a bad line aborts the merge with nothing at the
output path.

Memory stays bounded by one loaded legacy checkpoint (a pickle can only be
read whole), or by one block for ``.npy`` checkpoints.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoints import (
    BackgroundDigest,
    BackgroundJsonlCheck,
    Checkpoint,
    CheckpointInfo,
    NpyCheckpoint,
    file_sha256,
    find_checkpoints,
    open_checkpoint,
)
from .errors import MergeValidationError, OutputError
from .metrics import QualityMetrics
from .output import (
    ArticlesFormat,
    OutputWriter,
    StagingArea,
    bundle_articles_format,
    check_output_path,
    copies_checkpoint_lines,
    open_output,
    publish,
)

OUTPUT_DTYPES = ("float32", "float16")

# Rows are copied in blocks of about this many bytes.
_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class MergeProgress:
    """Reported after each block: rows read so far, of how many, from which file."""

    rows_done: int
    rows_total: int
    checkpoint: Path


@dataclass(frozen=True)
class MergeReport:
    output: Path
    checkpoints: int
    total_rows: int
    total_articles: int
    dropped_rows: int
    embedding_dim: int
    dtype: str
    model: str
    quality_metrics: dict[str, Any]
    elapsed_seconds: float
    peak_rss_bytes: int

    def summary(self) -> str:
        metrics = self.quality_metrics
        norms = (
            "L2 norm min/mean/max/std "
            + "/".join(f"{metrics[key]:.4g}" for key in ("norm_min", "norm_mean", "norm_max", "norm_std"))
            if metrics["norm_mean"] is not None
            else "no finite row"
        )
        return "\n".join(
            [
                f"Merged {self.total_articles:,} articles ({self.embedding_dim}-dim {self.dtype}, "
                f"{self.model}) from {self.checkpoints} checkpoints into {self.output}",
                f"  rows read {self.total_rows:,}; dropped {self.dropped_rows:,} non-article rows",
                f"  quality: {metrics['nan_values']:,} NaN and {metrics['inf_values']:,} Inf values, "
                f"{metrics['zero_norm_rows']:,} zero-norm rows, {metrics['duplicate_rows']:,} duplicate rows; {norms}",
                f"  time {self.elapsed_seconds:.1f} s; peak memory {self.peak_rss_bytes / 2**20:,.0f} MiB",
            ]
        )


@dataclass(frozen=True)
class _InfoOnly:
    """What is kept of a legacy checkpoint between planning and copying."""

    info: CheckpointInfo

    @property
    def path(self) -> Path:
        return self.info.path


def _open_all(download_dir: Path, line_check: BackgroundJsonlCheck | None = None) -> list[NpyCheckpoint | _InfoOnly]:
    """Open every checkpoint under ``download_dir``, by start index.

    A legacy checkpoint is dropped as soon as it is opened: only its info is
    kept, so memory holds at most one loaded pickle. With ``line_check``,
    the lines of each ``.npy`` checkpoint are given to it as soon as they
    are indexed, so that the check runs beside the rest of the merge.
    """
    paths = find_checkpoints(download_dir) if Path(download_dir).is_dir() else []
    if not paths:
        raise MergeValidationError(f"no checkpoints (*.pkl, *.npy) under {download_dir}/*/.")
    # No name holds a loaded pickle while the next one loads.
    opened = [_kept_part(open_checkpoint(path), line_check) for path in paths]
    return sorted(opened, key=lambda checkpoint: checkpoint.info.start_index)


def _kept_part(checkpoint: Checkpoint, line_check: BackgroundJsonlCheck | None) -> NpyCheckpoint | _InfoOnly:
    if not isinstance(checkpoint, NpyCheckpoint):
        return _InfoOnly(checkpoint.info)
    if line_check is not None:
        line_check.submit(checkpoint.articles_path, checkpoint.indexed_bytes)
    return checkpoint


def plan_merge(download_dir: Path) -> list[CheckpointInfo]:
    """Open every checkpoint under ``download_dir``, one at a time; their infos by start index."""
    return [checkpoint.info for checkpoint in _open_all(Path(download_dir))]


def validate_plan(infos: Sequence[CheckpointInfo], expect_articles: int | None = None) -> None:
    """Raise :class:`MergeValidationError` unless the checkpoints form one clean run."""
    first = infos[0]
    if first.start_index != 0:
        raise MergeValidationError(f"the first checkpoint, {first.path}, starts at index {first.start_index}, not 0.")
    for before, after in zip(infos, infos[1:]):
        if after.start_index < before.end_index:
            raise MergeValidationError(
                f"{before.path} [{before.start_index}, {before.end_index}) and {after.path} "
                f"[{after.start_index}, {after.end_index}) overlap at indices "
                f"{after.start_index}..{min(before.end_index, after.end_index) - 1}."
            )
        if after.start_index > before.end_index:
            raise MergeValidationError(
                f"indices {before.end_index}..{after.start_index - 1} are missing: "
                f"{before.path} ends at {before.end_index} and {after.path} starts at {after.start_index}."
            )
    for info in infos:
        if info.dim != first.dim:
            raise MergeValidationError(f"{first.path} has dimension {first.dim} but {info.path} has {info.dim}.")
        if info.model != first.model:
            raise MergeValidationError(
                f"{first.path} was made by model {first.model!r} but {info.path} by {info.model!r}."
            )
        if not np.issubdtype(info.dtype, np.floating):
            raise MergeValidationError(f"{info.path} holds {info.dtype} values, not floats.")
    articles = sum(info.article_rows for info in infos)
    if expect_articles is not None and articles != expect_articles:
        raise MergeValidationError(f"{expect_articles:,} articles were expected but the checkpoints hold {articles:,}.")


class _CopyPass:
    """Copies the article rows of each checkpoint into the output writer, in one pass.

    Every input byte is read once here: a ``.npy`` checkpoint's bytes are
    hashed (for ``chunk_info``) from the same buffer that is copied; legacy
    pickles, which can only be read whole by the unpickler, are hashed from
    the file by a worker thread.
    """

    def __init__(
        self,
        writer: OutputWriter,
        infos: Sequence[CheckpointInfo],
        opened: dict[Path, NpyCheckpoint],
        dtype: np.dtype,
        strict: bool,
        on_progress: Callable[[MergeProgress], None] | None,
    ):
        self.writer = writer
        self.infos = infos
        self.opened = opened
        self.dtype = dtype
        self.strict = strict
        self.on_progress = on_progress
        self.rows_total = sum(info.rows for info in infos)
        self.rows_done = 0
        dim = infos[0].dim
        self.block_rows = max(1, _BLOCK_BYTES // (dim * max(dtype.itemsize, infos[0].dtype.itemsize)))
        self.metrics = QualityMetrics(row_bytes=dim * dtype.itemsize)

    def run(self, digests: dict[Path, Callable[[], str]], file_hasher: ThreadPoolExecutor) -> None:
        """Copy everything; fill ``digests`` with how to get each checkpoint's sha256."""
        for info in self.infos:
            mapped = self.opened.get(info.path)
            if mapped is None:
                digests[info.path] = file_hasher.submit(file_sha256, info.path).result
                # Loaded here, released on return: one loaded pickle at a time.
                self._copy(info, open_checkpoint(info.path, info.cluster), None)
            else:
                digest = BackgroundDigest()
                try:
                    digest.update(mapped.header_bytes())
                    self._copy(info, mapped, digest)
                except BaseException:
                    digest.close()
                    raise
                digests[info.path] = digest.hexdigest

    def _copy(self, info: CheckpointInfo, checkpoint: Checkpoint, digest: BackgroundDigest | None) -> None:
        articles = self.writer.articles
        verbatim_lines = articles.copies_lines and isinstance(checkpoint, NpyCheckpoint)
        for block in checkpoint.blocks(self.block_rows):
            if digest is not None:
                digest.update(block.embeddings)
            keep = block.keep
            rows = block.embeddings if keep.all() else block.embeddings[keep]
            rows = rows.astype(self.dtype, copy=False)
            self.writer.embeddings.append(rows)
            self.metrics.add_dropped(int(len(keep) - keep.sum()))
            nonfinite_before = self.metrics.nonfinite_rows
            # While the rows are hashed and written, on other cores.
            self.metrics.add_rows(rows)
            if self.strict and self.metrics.nonfinite_rows > nonfinite_before:
                raise MergeValidationError(
                    f"{info.path} holds NaN or Inf values (--strict); "
                    f"{self.metrics.nan_values:,} NaN and {self.metrics.inf_values:,} Inf values so far."
                )
            if not verbatim_lines:
                articles.add(block)
            # The block's buffer is reused by the next block: the hashes must be done with it.
            self.writer.embeddings.wait()
            if digest is not None:
                digest.wait()
            self.rows_done += len(keep)
            if self.on_progress is not None:
                self.on_progress(MergeProgress(self.rows_done, self.rows_total, info.path))
        if verbatim_lines:
            articles.copy_lines(checkpoint)


def _chunk_info(info: CheckpointInfo, sha256: str) -> dict[str, Any]:
    return {
        "file": info.path.name,
        "cluster": info.cluster,
        "gpu_id": info.gpu_id,
        "hostname": info.hostname,
        "start_index": info.start_index,
        "end_index": info.end_index,
        "rows": info.rows,
        "articles_kept": info.article_rows,
        "size_bytes": info.size_bytes,
        "sha256": sha256,
    }


def _peak_rss_bytes() -> int:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge_checkpoints(
    download_dir: str | Path,
    output: str | Path,
    *,
    dtype: str = "float32",
    expect_articles: int | None = None,
    strict: bool = False,
    on_progress: Callable[[MergeProgress], None] | None = None,
    articles_format: ArticlesFormat | None = None,
) -> MergeReport:
    """Merge every checkpoint under ``<download_dir>/*/`` into ``output``.

    ``output`` ending in ``.pkl`` gets the legacy pickle, anything else the
    bundle directory, whose articles are ``articles_format`` (default:
    parquet where pyarrow is installed, else jsonl). Raises
    :class:`MergeValidationError`, :class:`CheckpointError` or
    :class:`OutputError`; on any failure, Ctrl-C included, nothing is left
    at ``output`` and the staging area is removed.
    """
    started = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise MergeValidationError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}.")
    output = Path(output)
    check_output_path(output)
    articles_format = bundle_articles_format(output, articles_format)
    with ExitStack() as cleanup:
        # Lines copied verbatim are parsed by no one else: every line is
        # checked in a worker process, forked now while this one is small,
        # and joined before the result is published.
        line_check = (
            cleanup.enter_context(BackgroundJsonlCheck()) if copies_checkpoint_lines(output, articles_format) else None
        )
        checkpoints = _open_all(Path(download_dir), line_check)
        infos = [checkpoint.info for checkpoint in checkpoints]
        validate_plan(infos, expect_articles)
        # .npy checkpoints stay open (a map and a line index); legacy ones are reopened one at a time.
        opened = {checkpoint.path: checkpoint for checkpoint in checkpoints if isinstance(checkpoint, NpyCheckpoint)}
        del checkpoints
        total_articles = sum(info.article_rows for info in infos)
        timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        digests: dict[Path, Callable[[], str]] = {}
        file_hasher = cleanup.enter_context(ThreadPoolExecutor(max_workers=1))
        try:
            staging = cleanup.enter_context(StagingArea(output))
            writer = open_output(staging, (total_articles, infos[0].dim), np.dtype(dtype), articles_format)
            try:
                copy_pass = _CopyPass(writer, infos, opened, np.dtype(dtype), strict, on_progress)
                copy_pass.run(digests, file_hasher)
                if line_check is not None:
                    line_check.wait()
                quality_metrics = copy_pass.metrics.result()
                writer.finish(
                    {
                        "total_articles": copy_pass.metrics.rows,
                        "embedding_dim": infos[0].dim,
                        "model": infos[0].model,
                        "timestamp": timestamp,
                        "quality_metrics": quality_metrics,
                        "chunk_info": [_chunk_info(info, digests[info.path]()) for info in infos],
                    }
                )
            finally:
                writer.close()
            publish(staging)
        except OSError as exc:
            # The disk filled up (ENOSPC), a size limit was hit (EFBIG), the
            # folder is read-only...: the staging area goes with the exception.
            raise OutputError(str(output), f"cannot be written ({exc.strerror or exc}); nothing was "
                                           f"left at this path. Free the space and run the merge again.") from exc
    return MergeReport(
        output=output,
        checkpoints=len(infos),
        total_rows=copy_pass.rows_total,
        total_articles=copy_pass.metrics.rows,
        dropped_rows=copy_pass.metrics.dropped_rows,
        embedding_dim=infos[0].dim,
        dtype=dtype,
        model=infos[0].model,
        quality_metrics=quality_metrics,
        elapsed_seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss_bytes(),
    )
