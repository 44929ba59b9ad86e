"""Merge every checkpoint of a run into one result, validated and memory-bounded.

Three steps, in this order:

1. **Read**: open each checkpoint in turn (one at a time) and keep its
   :class:`~.checkpoints.CheckpointInfo`. A ``.npy`` checkpoint stays open
   (a map and the index of its lines). A legacy pickle is read once, here:
   a pickle can only be loaded whole, and holding them all would break the
   memory bound, so what the output needs of it (its article rows in the
   output dtype, its article dicts as the output encodes them) is appended
   to scratch files in the staging area, and its quality metrics are taken.
2. **Validate** all of them together before the output is created:
   contiguous coverage of ``[0, N)`` from index 0, one dimension, one model,
   float dtypes, the expected article count.
3. **Copy**: preallocate the output, then fill it checkpoint by checkpoint
   in index order: a legacy checkpoint's bytes are copied from the scratch
   files (in the kernel where nothing needs to see them); a ``.npy``
   checkpoint's rows block by block, keeping only article rows, converting
   the dtype, accumulating the quality metrics and hashing inputs and
   output (on worker threads) in the same pass. The scratch files are then
   deleted and the result published atomically (see ``output.py``).

Every ``.jsonl`` line is parsed before anything is published. A ``.pkl``
output reads the rows as dicts: the copy parses them. A bundle's articles
are left to the article worker process (``merging/article_worker.py``): it parses
every line of each checkpoint from the moment the file is indexed where
``articles.jsonl`` copies them verbatim, and parses and writes the article
rows where they go to ``articles.parquet``; it runs beside the planning and
the copy, and is joined before the publish: a bad line aborts the merge
with nothing at the output path.

Memory stays bounded by one loaded legacy checkpoint (a pickle can only be
read whole), or by one block for ``.npy`` checkpoints. The quality metrics
are taken per checkpoint and combined in index order, so they do not depend
on the order in which the files were read.
"""

from __future__ import annotations

import functools
import re
import resource
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    AFTER_MERGE,
    CheckpointError,
    MergeValidationError,
    RowsMissingError,
    translating_local_errors,
)
from ..fileio import file_sha256
from ..layout import DownloadLayout
from ..output import (
    ArticlesFormat,
    OutputWriter,
    ScratchFile,
    StagingArea,
    articles_encoder,
    bundle_articles_format,
    check_output_path,
    copies_checkpoint_lines,
    is_pickle_output,
    open_output,
    publish,
    rows_offset,
)
from .article_worker import ArticleWorker
from .checkpoints import (
    LEGACY_SUFFIX,
    BackgroundDigest,
    CheckpointInfo,
    LegacyCheckpoint,
    NpyCheckpoint,
    RowBlock,
    find_checkpoints,
    open_checkpoint,
)
from .metrics import QualityMetrics

OUTPUT_DTYPES = ("float32", "float16")

# Rows are copied in blocks of about this many bytes.
_BLOCK_BYTES = 8 << 20


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
    # With ``partial``: the index ranges [start, end) that the result lacks.
    missing_ranges: tuple[tuple[int, int], ...] = ()
    # Checkpoints here that their cluster no longer held at the last sync.
    left_out: tuple[Path, ...] = ()

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
                f"  took     {self.elapsed_seconds:.1f} s; peak memory {self.peak_rss_bytes / 2**20:,.0f} MiB",
                *self._warnings(),
            ]
        )

    def _warnings(self) -> list[str]:
        lines = []
        if self.missing_ranges:
            ranges = ", ".join(f"{start:,}..{end - 1:,}" for start, end in self.missing_ranges)
            lines.append(f"  PARTIAL (--partial): this result lacks the rows at indices {ranges}")
        if self.left_out:
            names = ", ".join(f"{path.parent.name}/{path.name}" for path in self.left_out)
            lines.append(f"  left out {len(self.left_out)} checkpoint(s) that their cluster no longer held at "
                         f"the last sync: {names}")
        return lines


def _block_rows(dim: int, *dtypes: np.dtype) -> int:
    """Rows per block of about ``_BLOCK_BYTES``, in the widest of ``dtypes``."""
    return max(1, _BLOCK_BYTES // (dim * max(dtype.itemsize for dtype in dtypes)))


def _write_article_rows(
    block: RowBlock, dtype: np.dtype, write: Callable[[np.ndarray], None], metrics: QualityMetrics,
    strict: bool, path: Path,
) -> None:
    """Give the article rows of ``block``, in ``dtype``, to ``write``, then account for them in ``metrics``.

    With ``strict``, a NaN or an Inf is a :class:`MergeValidationError`.
    """
    keep = block.keep
    rows = block.embeddings if keep.all() else block.embeddings[keep]
    rows = rows.astype(dtype, copy=False)
    write(rows)
    metrics.add_dropped(int(len(keep) - keep.sum()))
    nonfinite_before = metrics.nonfinite_rows
    # Meanwhile the digests of a .npy checkpoint and of a bundle hash the rows on another core.
    metrics.add_rows(rows)
    if strict and metrics.nonfinite_rows > nonfinite_before:
        raise MergeValidationError(
            f"{path} holds NaN or Inf values (--strict); "
            f"{metrics.nan_values:,} NaN and {metrics.inf_values:,} Inf values in it so far."
        )


def _writing(output: Path):
    """The merge's writes, named by the output path (the staging area beside it is
    hidden, and goes with the exception)."""
    return translating_local_errors(output, "write", AFTER_MERGE)


@dataclass(frozen=True)
class _SpilledCheckpoint:
    """A legacy checkpoint after its one read: what the copy needs of it, in the scratch files."""

    info: CheckpointInfo
    metrics: QualityMetrics
    sha256: Callable[[], str]
    embeddings_offset: int  # its article rows, in the output dtype, back to back from here
    articles_offset: int  # its article rows as the output encodes them, from here ...
    articles_length: int  # ... for this many bytes

    @property
    def path(self) -> Path:
        return self.info.path


class _Spill:
    """Reads legacy checkpoints once each, leaving what the output needs in two scratch files.

    The output cannot be sized, nor its rows placed, before every checkpoint
    has been read: the rows of each legacy checkpoint are appended, in read
    order, to one scratch file, its articles (encoded as the output wants
    them) to another, and the copy takes them from there in index order.
    The rows start where a ``.pkl`` output's rows start: if the checkpoints
    were read in index order, that scratch file becomes the output as it is
    (see :func:`_rows_in_place`). Each file is hashed (for ``chunk_info``)
    by a worker thread meanwhile.
    """

    def __init__(
        self, staging: StagingArea, dtype: np.dtype, encode_articles: Callable[[RowBlock], bytes], strict: bool,
        recorded_sha256: Callable[[Path], str | None],
    ):
        self.output = staging.output
        self.recorded_sha256 = recorded_sha256
        self.dtype = dtype
        self.encode_articles = encode_articles
        self.strict = strict
        self.rows_offset = rows_offset(self.output)
        self._hasher = ThreadPoolExecutor(max_workers=1)
        try:
            with _writing(self.output):
                self.embeddings = ScratchFile(staging.path / "embeddings.scratch", self.rows_offset or 0)
                self.articles = ScratchFile(staging.path / "articles.scratch")
        except BaseException:
            self._hasher.shutdown()
            raise

    def read(self, path: Path) -> _SpilledCheckpoint:
        sha256 = _sha256_of(path, self.recorded_sha256) or self._hasher.submit(file_sha256, path).result
        checkpoint = LegacyCheckpoint(path)
        info = checkpoint.info
        metrics = QualityMetrics(row_bytes=info.dim * self.dtype.itemsize)
        embeddings_offset, articles_offset = self.embeddings.size, self.articles.size
        with _writing(self.output):
            for block in checkpoint.blocks(_block_rows(info.dim, self.dtype, info.dtype)):
                _write_article_rows(block, self.dtype, self._append_rows, metrics, self.strict, path)
                self.articles.append(self.encode_articles(block))
        return _SpilledCheckpoint(
            info, metrics, sha256, embeddings_offset, articles_offset, self.articles.size - articles_offset
        )

    def _append_rows(self, rows: np.ndarray) -> None:
        self.embeddings.append(np.ascontiguousarray(rows))

    def remove(self) -> None:
        """Delete the scratch files: their bytes are in the output, or nowhere."""
        self.embeddings.remove()
        self.articles.remove()

    def __enter__(self) -> _Spill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.remove()
        finally:
            self._hasher.shutdown(cancel_futures=True)


_ReadCheckpoint = NpyCheckpoint | _SpilledCheckpoint


def _known(sha256: str) -> Callable[[], str]:
    return lambda: sha256


def _sha256_of(path: Path, recorded_sha256: Callable[[Path], str | None]) -> Callable[[], str] | None:
    """How to get the sha256 that the sync recorded for ``path``; None if there is none to trust.

    Asked for once the file has been read (for ``chunk_info``), it checks
    that the file is still the one the sync hashed: one that changed while
    it was being merged fails the merge rather than getting that sha256.
    """
    recorded = recorded_sha256(path)
    if recorded is None:
        return None

    def still_recorded() -> str:
        if recorded_sha256(path) != recorded:
            raise CheckpointError(str(path), "changed while it was being merged; run the merge again.")
        return recorded

    return still_recorded


def _rows_in_place(parts: Sequence[_ReadCheckpoint], spill: _Spill) -> Path | None:
    """The spill's rows file if it holds the output's rows at their place, ready to become the output.

    So it is when every checkpoint is a legacy one and they were read in
    index order, for a ``.pkl`` output (see :func:`~.output.rows_offset`).
    """
    expected = spill.rows_offset
    for part in parts:
        if expected is None or not isinstance(part, _SpilledCheckpoint) or part.embeddings_offset != expected:
            return None
        expected += part.info.article_rows * part.info.dim * spill.dtype.itemsize
    return spill.embeddings.path


def _natural_order(path: Path) -> list[int | str]:
    # "ckpt_5000" before "ckpt_10000", as most runs number their files.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def select_checkpoints(download_dir: Path, clusters: Collection[str] | None = None) -> tuple[list[Path], list[Path]]:
    """The checkpoints to merge under ``download_dir``, in natural order of their names, and those left out.

    Only the folders of ``clusters`` (all, when None). Where the sync
    recorded what a cluster held at its last listing, a file it no longer
    held (deleted or re-split there since) is left out, never merged
    silently: the caller reports it. Read in natural order, checkpoints
    usually come in index order, which lets a ``.pkl`` output keep the rows
    where they were first written.
    """
    layout = DownloadLayout(download_dir)
    found = find_checkpoints(download_dir) if Path(download_dir).is_dir() else []
    listings = {cluster: layout.load_listing(cluster) for cluster in {path.parent.name for path in found}}
    selected: list[Path] = []
    left_out: list[Path] = []
    for path in found:
        if clusters is not None and path.parent.name not in clusters:
            continue
        listed = listings[path.parent.name]
        (selected if listed is None or path.name in listed else left_out).append(path)
    if not selected:
        where = f"{download_dir}/{{{','.join(sorted(clusters))}}}/" if clusters is not None else f"{download_dir}/*/"
        also = f" ({len(left_out)} more are no longer on their cluster)" if left_out else ""
        raise MergeValidationError(f"no checkpoints (*.pkl, *.npy) under {where}{also}.")
    return sorted(selected, key=_natural_order), sorted(left_out, key=_natural_order)


def _read_all(paths: Sequence[Path], spill: _Spill, line_check: ArticleWorker | None = None,
              on_read: Callable[[int, int], None] | None = None) -> list[_ReadCheckpoint]:
    """Read the checkpoints at ``paths``, one at a time; by start index.

    A legacy checkpoint is read through ``spill`` and dropped at once, so
    memory holds at most one loaded pickle. With ``line_check``, every line
    of each ``.npy`` checkpoint is given to it to parse as soon as the file
    is indexed, so that the check runs beside the rest of the merge.
    """
    parts = []
    for path in paths:
        parts.append(_read_one(path, spill, line_check))
        if on_read is not None:
            on_read(len(parts), len(paths))
    return sorted(parts, key=lambda part: part.info.start_index)


def _read_one(path: Path, spill: _Spill, line_check: ArticleWorker | None) -> _ReadCheckpoint:
    if path.suffix == LEGACY_SUFFIX:
        return spill.read(path)
    checkpoint = NpyCheckpoint(path)
    if line_check is not None:
        line_check.submit(checkpoint.articles_path, [(0, checkpoint.indexed_bytes, 1)])
    return checkpoint


def validate_plan(
    infos: Sequence[CheckpointInfo], expect_articles: int | None = None, *,
    expect_rows: int | None = None, partial: bool = False,
) -> list[tuple[int, int]]:
    """Raise :class:`MergeValidationError` unless the checkpoints form one clean run.

    The run's rows are ``[0, N)``, where ``N`` is declared by ``expect_rows``
    (the config's ``total_rows``) or by the checkpoints' own ``total_rows``,
    else is wherever the last checkpoint ends. ``partial`` accepts missing
    rows (never overlaps) and returns their ranges ``[start, end)``.
    """
    missing: list[tuple[int, int]] = []

    def lacking(start: int, end: int, problem: MergeValidationError) -> None:
        if not partial:
            raise problem
        missing.append((start, end))

    first = infos[0]
    if first.start_index != 0:
        lacking(0, first.start_index, MergeValidationError(
            f"the first checkpoint, {first.path}, starts at index {first.start_index:,}, not 0: "
            f"indices 0..{first.start_index - 1:,} are missing."))
    for before, after in zip(infos, infos[1:]):
        if after.start_index < before.end_index:
            raise MergeValidationError(
                f"{before.path} [{before.start_index:,}, {before.end_index:,}) and {after.path} "
                f"[{after.start_index:,}, {after.end_index:,}) overlap at indices "
                f"{after.start_index:,}..{min(before.end_index, after.end_index) - 1:,}."
            )
        if after.start_index > before.end_index:
            lacking(before.end_index, after.start_index, MergeValidationError(
                f"indices {before.end_index:,}..{after.start_index - 1:,} are missing: "
                f"{before.path} ends at {before.end_index:,} and {after.path} starts at {after.start_index:,}."
            ))
    declared = _declared_rows(infos, expect_rows)
    if declared is not None:
        rows, declared_by = declared
        last = infos[-1]
        if last.end_index > rows:
            raise MergeValidationError(
                f"{last.path} ends at index {last.end_index:,}, past the run's {rows:,} rows ({declared_by}).")
        if last.end_index < rows:
            lacking(last.end_index, rows, RowsMissingError(rows, declared_by, last.end_index, str(last.path)))
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
    return missing


def _rows_only_left_out(left_out: Sequence[Path], infos: Sequence[CheckpointInfo], partial: bool
                        ) -> list[tuple[int, int]]:
    """Rows that only checkpoints the cluster no longer holds carry: a GPU's file deleted
    there (not re-split) would otherwise leave a result short with nothing to tell. Raises
    unless ``partial``, which gets their ranges ``[start, end)``."""
    missing: list[tuple[int, int]] = []
    for path in left_out:
        try:
            info = open_checkpoint(path).info
        except CheckpointError:
            continue  # left out anyway; whatever it held cannot be told
        uncovered = [(info.start_index, info.end_index)]
        for merged in infos:
            uncovered = [piece for start, end in uncovered for piece in (
                (start, min(end, merged.start_index)), (max(start, merged.end_index), end)) if piece[0] < piece[1]]
        for start, end in uncovered:
            if not partial:
                raise MergeValidationError(
                    f"indices {start:,}..{end - 1:,} are only in {path}, which {path.parent.name} no longer held "
                    f"at the last sync: was it deleted there? Run `sync` again if it is back on the cluster, "
                    f"or add --partial to merge without those rows.")
            missing.append((start, end))
    return missing


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges, overlapping ones joined."""
    joined: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if joined and start <= joined[-1][1]:
            joined[-1] = (joined[-1][0], max(joined[-1][1], end))
        else:
            joined.append((start, end))
    return joined


def _declared_rows(infos: Sequence[CheckpointInfo], expect_rows: int | None) -> tuple[int, str] | None:
    """The run's total rows and who declared it, where anyone did; declarations must agree."""
    carriers = [info for info in infos if info.total_rows is not None]
    for info in carriers[1:]:
        if info.total_rows != carriers[0].total_rows:
            raise MergeValidationError(
                f"{carriers[0].path} says the run has {carriers[0].total_rows:,} rows (total_rows) "
                f"but {info.path} says {info.total_rows:,}: are they from the same run?")
    if expect_rows is not None:
        if carriers and carriers[0].total_rows != expect_rows:
            raise MergeValidationError(
                f"the config's total_rows is {expect_rows:,} but {carriers[0].path} says the run has "
                f"{carriers[0].total_rows:,} rows.")
        return expect_rows, "total_rows in the config"
    if carriers:
        return carriers[0].total_rows, "total_rows in its checkpoints"
    return None


class _CopyPass:
    """Fills the output writer with the article rows of every checkpoint, in index order.

    A legacy checkpoint's rows and articles are copied from the spill's
    scratch files. A ``.npy`` checkpoint is read once here: its bytes are
    hashed (for ``chunk_info``) from the same buffer that is copied, its
    rows measured as they pass.
    """

    def __init__(
        self,
        writer: OutputWriter,
        parts: Sequence[_ReadCheckpoint],
        spill: _Spill,
        dtype: np.dtype,
        strict: bool,
        on_progress: Callable[[MergeProgress], None] | None,
    ):
        self.writer = writer
        self.parts = parts
        self.spill = spill
        self.dtype = dtype
        self.strict = strict
        self.on_progress = on_progress
        self.rows_total = sum(part.info.rows for part in parts)
        self.recorded_sha256 = spill.recorded_sha256
        self.rows_done = 0
        self.metrics = QualityMetrics(row_bytes=parts[0].info.dim * dtype.itemsize)

    def run(self) -> list[Callable[[], str]]:
        """Copy everything; how to get each checkpoint's sha256, in index order."""
        digests: list[Callable[[], str]] = []
        for part in self.parts:
            if isinstance(part, NpyCheckpoint) and (recorded := _sha256_of(part.path, self.recorded_sha256)):
                # Synced and untouched since: no need to hash it again.
                metrics = self._copy(part, None)
                digests.append(recorded)
            elif isinstance(part, NpyCheckpoint) and not part.rows_in_file_order:
                # Its blocks are not the file's bytes in order: the file is hashed on its own.
                metrics = self._copy(part, None)
                digests.append(functools.partial(file_sha256, part.path))
            elif isinstance(part, NpyCheckpoint):
                # Its thread lives as long as its copy, whatever ends it.
                with BackgroundDigest() as digest:
                    digest.update(part.header_bytes())
                    metrics = self._copy(part, digest)
                    digests.append(_known(digest.hexdigest()))
            else:
                self._copy_spilled(part)
                digests.append(part.sha256)
                metrics = part.metrics
            # In index order, whatever order the checkpoints were read in.
            self.metrics.absorb(metrics)
        return digests

    def _copy_spilled(self, part: _SpilledCheckpoint) -> None:
        self.writer.embeddings.copy_from(self.spill.embeddings.fd, part.embeddings_offset, part.info.article_rows)
        self.writer.articles.add_encoded(self.spill.articles, part.articles_offset, part.articles_length, part.path)
        self._progress(part.info.rows, part.path)

    def _copy(self, checkpoint: NpyCheckpoint, digest: BackgroundDigest | None) -> QualityMetrics:
        info = checkpoint.info
        metrics = QualityMetrics(row_bytes=info.dim * self.dtype.itemsize)
        articles = self.writer.articles
        for block in checkpoint.blocks(_block_rows(info.dim, self.dtype, info.dtype)):
            if digest is not None:
                digest.update(block.embeddings)
            _write_article_rows(block, self.dtype, self.writer.embeddings.append, metrics, self.strict, info.path)
            if not articles.takes_lines:
                articles.add(block)
            # The block's buffer is reused by the next block: the hashes must be done with it.
            self.writer.embeddings.wait()
            if digest is not None:
                digest.wait()
            self._progress(len(block.keep), info.path)
        if articles.takes_lines:
            articles.add_lines(checkpoint)
        return metrics

    def _progress(self, rows: int, path: Path) -> None:
        self.rows_done += rows
        if self.on_progress is not None:
            self.on_progress(MergeProgress(self.rows_done, self.rows_total, path))


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
    clusters: Collection[str] | None = None,
    expect_rows: int | None = None,
    partial: bool = False,
    on_read: Callable[[int, int], None] | None = None,
) -> MergeReport:
    """Merge every checkpoint under ``<download_dir>/*/`` into ``output``.

    ``clusters`` limits it to those folders; checkpoints that their cluster
    no longer held at the last sync are left out (``left_out``). The rows
    must cover the whole run (see :func:`validate_plan`: ``expect_rows``,
    ``partial``).

    ``output`` ending in ``.pkl`` or ``.pickle`` (any case) gets the legacy pickle, anything else the
    bundle directory, whose articles are ``articles_format`` (default:
    jsonl, on every install). Raises
    :class:`MergeValidationError`, :class:`CheckpointError` or
    :class:`OutputError` or :class:`LocalFileError`; on any failure, Ctrl-C included, nothing is left
    at ``output`` and the staging area is removed.
    """
    started = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise MergeValidationError(f"output dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}.")
    output = Path(output)
    check_output_path(output)
    articles_format = bundle_articles_format(output, articles_format)
    with ExitStack() as cleanup:
        # Legacy checkpoints leave what the output needs in the staging area
        # as they are read; the output itself is created only once they are
        # all read and validated. Made first: an output folder that cannot
        # be written then fails before any worker process is started.
        staging = cleanup.enter_context(StagingArea(output))
        # A bundle's articles are parsed in a worker process (started now:
        # it starts up while the checkpoints are read), and written there
        # if they are parquet; lines copied verbatim into articles.jsonl are
        # parsed by no one else, so the worker checks every line of every
        # checkpoint.
        worker = None if is_pickle_output(output) else cleanup.enter_context(ArticleWorker())
        line_check = worker if copies_checkpoint_lines(output, articles_format) else None
        # A checkpoint that the sync downloaded and verified, untouched since,
        # has its sha256 (for chunk_info) in the sync's journal.
        recorded_sha256 = DownloadLayout(download_dir).verified_sha256
        spill = cleanup.enter_context(
            _Spill(staging, np.dtype(dtype), articles_encoder(output, articles_format), strict, recorded_sha256)
        )
        paths, left_out = select_checkpoints(Path(download_dir), clusters)
        parts = _read_all(paths, spill, line_check, on_read)
        infos = [part.info for part in parts]
        # The file a cluster no longer holds first: it names where the rows are, which
        # the general "rows missing" (past total_rows, or a gap) cannot.
        only_left_out = _rows_only_left_out(left_out, infos, partial)
        missing_ranges = _union(only_left_out + validate_plan(infos, expect_articles, expect_rows=expect_rows,
                                                              partial=partial))
        total_articles = sum(info.article_rows for info in infos)
        timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with _writing(output):
            writer = open_output(
                staging, (total_articles, infos[0].dim), np.dtype(dtype), articles_format,
                _rows_in_place(parts, spill), worker,
            )
            try:
                copy_pass = _CopyPass(writer, parts, spill, np.dtype(dtype), strict, on_progress)
                digests = copy_pass.run()
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
                        "chunk_info": [_chunk_info(info, digest()) for info, digest in zip(infos, digests)],
                    }
                )
            finally:
                writer.close()
            # Before the publish: a bundle's staging directory becomes the output.
            spill.remove()
            publish(staging)
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
        missing_ranges=tuple(missing_ranges),
        left_out=tuple(left_out),
    )
