"""Merge every checkpoint of a run into one result, validated and memory-bounded.

Three steps, in this order: **read** each checkpoint once (``merging/spill.py``;
legacy pickles are staged in the scratch files as they are read), **validate**
them together before the output is created (``merging/plan.py``), **copy**
them into the writer that the output spec opens, in index order
(``merging/copy_pass.py``), then publish atomically (``output/staging.py``).

Every ``.jsonl`` line is parsed before anything is published: by the copy
for a ``.pkl`` output, by the article worker process
(``merging/article_worker.py``) for a bundle, beside the planning and the
copy, joined before the publish. Memory stays bounded by one loaded legacy
checkpoint, or by one block for ``.npy`` checkpoints. The quality metrics
are taken per checkpoint and combined in index order, so they do not depend
on the order in which the files were read.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..gone import VerifiedCopy
from ..layout import DownloadLayout
from ..output import OUTPUT_DTYPES, ArticlesFormat, OutputSpec
from ..output.forms import DEFAULT_ARTICLES_FORMAT, metadata_suffix
from ..output.scratch import StagedCheckpoint
from ..output.staging import StagingArea, check_room, publish
from .article_worker import ArticleWorker
from .checkpoints import CheckpointInfo
from .copy_pass import CopyPass, MergeProgress, checked_against_sync, writing
from .metrics import RowHashBuckets
from .plan import keep_verified_copies, missing_rows, select_checkpoints, verified_copies
from .spill import ReadCheckpoint, Spill, SpilledCheckpoint, read_all

# OUTPUT_DTYPES: the dtypes a merge writes, named where merge_checkpoints is.
__all__ = ["OUTPUT_DTYPES", "MergeProgress", "MergeReport", "merge_checkpoints"]


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
    # With ``partial``: the index ranges [start, end) that the result lacks.
    missing_ranges: tuple[tuple[int, int], ...] = ()
    # Checkpoints here that their cluster no longer held at the last sync, not merged.
    left_out: tuple[Path, ...] = ()
    # Checkpoints gone from their cluster (purged from scratch), merged from the copy a sync verified here.
    kept: tuple[VerifiedCopy, ...] = ()
    # A bundle's: how many shards, of how many rows at most, and its metadata files' suffix.
    shards: tuple[int, int, str] | None = None
    # Neither the configuration (``expect_rows``, ``expect_articles``) nor any checkpoint
    # (``total_rows``) said how large the run is: a missing last piece could not be noticed.
    completeness_unchecked: bool = False
    # Staging areas beside the output that another machine's merge made: named, never removed here.
    staging_elsewhere: tuple[Path, ...] = ()

    def summary(self) -> str:
        """A few lines that fit an 80-column terminal (the output's path on a line of its own)."""
        metrics = self.quality_metrics
        norms = (
            ", ".join(f"{name} {metrics[f'norm_{name}']:.4g}" for name in ("min", "mean", "max", "std"))
            if metrics["norm_mean"] is not None
            else "no finite row"
        )
        return "\n".join(
            [
                f"Merged {self.total_articles:,} articles from {self.checkpoints} checkpoints into",
                f"  {self.output}",
                f"  vectors  {self.embedding_dim}-dim {self.dtype}, {self.model}",
                f"  rows     {self.total_rows:,} read; dropped {self.dropped_rows:,} non-article rows",
                f"  quality  {metrics['nan_values']:,} NaN, {metrics['inf_values']:,} Inf, "
                f"{metrics['zero_norm_rows']:,} zero-norm rows, {metrics['duplicate_rows']:,} duplicate rows",
                f"  L2 norm  {norms}",
                *self._shards(),
                f"  took     {self.elapsed_seconds:.1f} s; peak memory {self.peak_rss_bytes / 2**20:,.0f} MiB",
                *self._warnings(),
            ]
        )

    def _shards(self) -> list[str]:
        if self.shards is None:
            return []
        count, rows, suffix = self.shards
        return [f"  shards   {count:,} of up to {rows:,} rows: embeddings/*.npy, metadata/*{suffix}"]

    def _warnings(self) -> list[str]:
        lines = [f"  {copy.kept_line()}" for copy in self.kept]
        if self.missing_ranges:
            ranges = ", ".join(f"{start:,}..{end - 1:,}" for start, end in self.missing_ranges)
            lines.append(f"  PARTIAL (--partial): this result lacks the rows at indices {ranges}")
        if self.left_out:
            names = ", ".join(f"{DownloadLayout.cluster_of(path)}/{path.name}" for path in self.left_out)
            lines.append(f"  left out {len(self.left_out)} checkpoint(s) that their cluster no longer held at "
                         f"the last sync: {names}")
        for path in self.staging_elsewhere:
            lines += [f"  another machine's merge left {path}",
                      "  (not removed: it may still run there); remove it once that merge is gone"]
        if self.completeness_unchecked:
            lines += [
                "  UNCHECKED: nothing gave the run's total rows, so rows missing after the last",
                "  checkpoint would go unnoticed: set \"total_rows\": N in credentials.json, or",
                "  have the embedding job write total_rows in its checkpoints",
            ]
        return lines


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
    output: str | Path | OutputSpec,
    *,
    dtype: str = "float32",
    expect_articles: int | None = None,
    strict: bool = False,
    on_progress: Callable[[MergeProgress], None] | None = None,
    articles_format: ArticlesFormat | None = None,
    clusters: Collection[str] | None = None,
    expect_rows: int | None = None,
    partial: bool = False,
    on_read: Callable[[int, int], None] | None = None,
    shard_rows: int | None = None,
    free_space: Callable[[Path], tuple[int, str]] | None = None,
) -> MergeReport:
    """Merge every checkpoint under ``<download_dir>/*/`` into ``output``.

    ``clusters`` limits it to those folders; of the checkpoints that their
    cluster no longer held at the last sync, those a sync verified here are
    merged from here unless the cluster's current files overlap them
    (``kept``), the others are left out (``left_out``). The rows
    must cover the whole run (see :func:`~.plan.validate_plan`: ``expect_rows``,
    ``partial``).

    ``output`` ending in ``.pkl`` or ``.pickle`` (any case) gets the legacy pickle, anything else the
    bundle directory, in shards of ``shard_rows`` rows (default: about 1 GiB of vectors each),
    whose articles are ``articles_format`` (default: parquet); an :class:`~..output.OutputSpec`
    decided already stands for ``output``, ``dtype``, ``articles_format`` and ``shard_rows``. Raises
    :class:`MergeValidationError`, :class:`CheckpointError` or
    :class:`OutputError` or :class:`LocalFileError`; on any failure, Ctrl-C included, nothing is left
    at ``output`` and the staging area is removed. A result its file system has no room for
    (``free_space``: how its free bytes and mount point are told, by default ``os.statvfs``) is
    refused before the output is made.
    """
    started = time.perf_counter()
    spec = output if isinstance(output, OutputSpec) else OutputSpec.decide(output, dtype, articles_format,
                                                                           shard_rows=shard_rows)
    with ExitStack() as cleanup:
        # Legacy checkpoints leave what the output needs in the staging area
        # as they are read; the output itself is created only once they are
        # all read and validated. Made first: an output folder that cannot
        # be written then fails before any worker process is started.
        staging = cleanup.enter_context(StagingArea(spec))
        # Started now: it starts up while the checkpoints are read.
        worker = cleanup.enter_context(ArticleWorker()) if spec.uses_article_worker else None
        # A checkpoint that the sync downloaded and verified, untouched since,
        # has its sha256 (for chunk_info) in the sync's journal.
        recorded_sha256 = DownloadLayout(download_dir).verified_sha256
        # Row hashes for the duplicate count, on disk: 16 bytes a row is no constant at 25M rows.
        with writing(spec.path):
            hashes = RowHashBuckets(staging.path / "row-hashes")
        cleanup.callback(hashes.remove)
        spill = cleanup.enter_context(Spill(staging, spec, strict, recorded_sha256, hashes))
        paths, gone = select_checkpoints(Path(download_dir), clusters)
        parts, kept, overlapped = _read(paths, verified_copies(Path(download_dir), gone), spill,
                                        worker if spec.surveys_article_keys else None, on_read)
        infos = [part.info for part in parts]
        kept_paths = {copy.path for copy in kept}
        left_out = [path for path in gone if path not in kept_paths]
        missing_ranges = missing_rows(left_out, infos, expect_articles, expect_rows, partial, overlapped)
        copy_pass = CopyPass(parts, recorded_sha256, spec.dtype, strict, on_progress, hashes)
        # Before the output is made: a result its file system has no room for is refused in one line.
        check_room(staging, _expected_bytes(spec, parts, spill), free_space)
        quality_metrics = _write(spec, staging, spill, copy_pass, worker, DownloadLayout(download_dir))
    return MergeReport(
        output=spec.path,
        checkpoints=len(infos),
        total_rows=copy_pass.rows_total,
        total_articles=copy_pass.metrics.rows,
        dropped_rows=copy_pass.metrics.dropped_rows,
        embedding_dim=infos[0].dim,
        dtype=spec.dtype.name,
        model=infos[0].model,
        quality_metrics=quality_metrics,
        elapsed_seconds=time.perf_counter() - started,
        peak_rss_bytes=_peak_rss_bytes(),
        shards=_shards(spec, copy_pass.metrics.rows, infos[0].dim),
        missing_ranges=tuple(missing_ranges),
        left_out=tuple(left_out),
        kept=tuple(kept),
        staging_elsewhere=tuple(staging.foreign),
        completeness_unchecked=(expect_rows is None and expect_articles is None
                                and all(info.total_rows is None for info in infos)),
    )


def _read(paths: Sequence[Path], copies: Sequence[VerifiedCopy], spill: Spill, survey: ArticleWorker | None,
          on_read: Callable[[int, int], None] | None
          ) -> tuple[list[ReadCheckpoint], list[VerifiedCopy], list[Path]]:
    """Read the checkpoints the clusters hold now (``paths``), then those of the verified
    ``copies`` of gone ones that none of them overlaps: all of them read, by start index; the
    copies kept; the paths of the copies left out. ``on_read`` counts the copies left out as
    read once they are known (each was opened for its index range)."""
    total = len(paths) + len(copies)

    def counted(before: int) -> Callable[[int, int], None] | None:
        return None if on_read is None else (lambda done, _: on_read(before + done, total))

    parts = read_all(paths, spill, survey, counted(0))
    kept, overlapped = keep_verified_copies(copies, [part.info for part in parts])
    parts += read_all([copy.path for copy in kept], spill, survey, counted(len(paths) + len(overlapped)))
    if on_read is not None and overlapped and not kept:
        on_read(total, total)
    return sorted(parts, key=lambda part: part.info.start_index), kept, overlapped


def _write(spec: OutputSpec, staging: StagingArea, spill: Spill, copy_pass: CopyPass,
           worker: ArticleWorker | None, layout: DownloadLayout) -> dict[str, Any]:
    """Open the output's writer, fill it, finish it and publish it; the quality metrics."""
    parts = copy_pass.parts
    infos = [part.info for part in parts]
    timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with writing(spec.path):
        writer = spec.open_writer(
            staging.path, sum(info.article_rows for info in infos), infos[0].dim, spill.scratch,
            _staged_in_index_order(parts), worker,
        )
        try:
            digests = copy_pass.run(writer)
            if worker is not None:
                worker.finish()
            quality_metrics = copy_pass.metrics.result()
            writer.finish(
                {
                    "total_articles": copy_pass.metrics.rows,
                    "embedding_dim": infos[0].dim,
                    "model": infos[0].model,
                    "timestamp": timestamp,
                    "quality_metrics": quality_metrics,
                    # Each hash held to the one the sync verified, if it did: a damaged copy fails here.
                    "chunk_info": [_chunk_info(info, checked_against_sync(info.path, digest(), layout))
                                   for info, digest in zip(infos, digests)],
                }
            )
        finally:
            writer.close()
        # Before the publish: a bundle's staging directory becomes the output.
        spill.remove()
        if copy_pass.hashes is not None:
            copy_pass.hashes.remove()
        publish(staging)
    return quality_metrics


# What the duplicate count's row hashes take in the staging area, per row (metrics.RowHashBuckets).
_ROW_HASH_BYTES = 16


def _expected_bytes(spec: OutputSpec, parts: Sequence[ReadCheckpoint], spill: Spill) -> int:
    """About what the merge still writes beside its output: the rows (rows x dim x the output
    dtype's bytes; none if the staged rows of legacy checkpoints become the pickle as they are),
    the articles (as large as a ``.npy`` checkpoint's JSON lines, or a legacy one's staged
    articles), and the row hashes of the duplicate count."""
    infos = [part.info for part in parts]
    rows = sum(info.article_rows for info in infos)
    vectors = rows * infos[0].dim * spec.dtype.itemsize
    if spec.is_pickle and spill.scratch.rows_in_place(_staged_in_index_order(parts), vectors) is not None:
        vectors = 0
    articles = 0
    for part in parts:
        if isinstance(part, SpilledCheckpoint):
            articles += part.staged.articles_length
        else:
            try:
                articles += part.articles_path.stat().st_size
            except OSError:
                pass
    return vectors + articles + sum(info.rows for info in infos) * _ROW_HASH_BYTES


def _shards(spec: OutputSpec, rows: int, dim: int) -> tuple[int, int, str] | None:
    if spec.is_pickle:
        return None
    plan = spec.shard_plan(rows, dim)
    return plan.count, plan.shard_rows, metadata_suffix(spec.articles_format or DEFAULT_ARTICLES_FORMAT)


def _staged_in_index_order(parts: Sequence[ReadCheckpoint]) -> list[StagedCheckpoint]:
    return [part.staged for part in parts if isinstance(part, SpilledCheckpoint)]
