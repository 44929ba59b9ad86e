"""The Python API: ``sync``, ``merge`` and ``load``, as the README shows them.

The same work as the commands, with the same defaults, from a script or a
notebook::

    from async_embed_sync import sync, merge, load

    sync()                     # ./credentials.json, every cluster, into embeddings/checkpoints
    merge(output="embeddings/merged")
    result = load("embeddings/merged")

``sync`` raises ``SyncFailedError`` when a cluster did not sync completely
(``exc.report``: the whole report). Progress shows as bars on a terminal,
as ``tqdm.auto`` bars in a notebook, and not at all elsewhere (pass
``progress=``, a Progress or a tqdm class, to choose). ``sync`` always holds the download directory's
lock. Inside a running event loop (a Jupyter notebook) ``sync`` runs its
own loop on a thread of its own; ``await sync_async(...)`` and
``await merge_async(...)`` are the async forms.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from .config import ClusterConfig, Config, load_config
from .errors import SyncFailedError
from .progress import Progress, QuietProgress, TqdmProgress
from .transfer.lock import DownloadDirLock, reading_lock
from .transfer.prompts import Prompter, TerminalPrompter
from .transfer.options import DEFAULT_DOWNLOAD_DIR, SyncOptions

if TYPE_CHECKING:
    from .merging.merge import MergeReport
    from .output.forms import ArticlesFormat
    from .transfer.sync import SyncReport

DEFAULT_OUTPUT = "embeddings/wikipedia_merged.pkl"
PathLike = str | os.PathLike[str]


def sync(config: PathLike | Config | None = None, *, clusters: Sequence[str] | None = None,
         download_dir: PathLike = DEFAULT_DOWNLOAD_DIR, max_parallel: int = SyncOptions.max_parallel,
         timeout: float = SyncOptions.timeout, retries: int = SyncOptions.retries, settle: float | None = None,
         progress: Progress | type | None = None, prompter: Prompter | None = None) -> SyncReport:
    """Download every checkpoint of the configured clusters (or of ``clusters``).

    ``config``: a ``credentials.json`` path, a loaded :class:`~.config.Config`,
    or None for the CLI's search. ``settle``: as ``--settle`` (None: the config's
    ``settle_seconds``, else 60). ``progress``: a :class:`~.progress.Progress`,
    or a tqdm class (``tqdm.auto.tqdm``) to draw the bars with.

    Returns the report when every cluster synced completely. Otherwise raises
    :class:`~.errors.SyncFailedError` once every cluster has had its turn (a
    failing one never stops the others): ``exc.report`` is the whole report,
    the clusters that synced too.
    """
    from .transfer.sync import sync as sync_download_dir  # the SSH stack loads with the first sync

    run = functools.partial(sync_download_dir, *_prepare(config, clusters, max_parallel, timeout, retries,
                                                         settle, progress, prompter, download_dir))
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _raise_for_failures(run())
    # A loop runs in this thread (a notebook): another cannot nest in it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="async_embed_sync") as thread:
        return _raise_for_failures(thread.submit(run).result())


def _raise_for_failures(report: SyncReport) -> SyncReport:
    """The report, or its :class:`~.errors.SyncFailedError` with the report attached (``exc.report``)."""
    try:
        report.raise_for_failures()
    except SyncFailedError as exc:
        exc.report = report
        raise
    return report


async def sync_async(config: PathLike | Config | None = None, *, clusters: Sequence[str] | None = None,
                     download_dir: PathLike = DEFAULT_DOWNLOAD_DIR, max_parallel: int = SyncOptions.max_parallel,
                     timeout: float = SyncOptions.timeout, retries: int = SyncOptions.retries,
                     settle: float | None = None, progress: Progress | type | None = None,
                     prompter: Prompter | None = None) -> SyncReport:
    """:func:`sync`, awaited in the caller's event loop; raises as it does."""
    from .transfer.sync import sync_clusters

    selected, directory, chosen_progress, options = _prepare(
        config, clusters, max_parallel, timeout, retries, settle, progress, prompter, download_dir)
    with DownloadDirLock(directory):
        return _raise_for_failures(await sync_clusters(selected, directory, chosen_progress, options))


def _prepare(config: PathLike | Config | None, clusters: Sequence[str] | None, max_parallel: int, timeout: float,
             retries: int, settle: float | None, progress: Progress | type | None, prompter: Prompter | None,
             download_dir: PathLike
             ) -> tuple[list[ClusterConfig], str, Progress, SyncOptions]:
    if not isinstance(config, Config):
        config = load_config(config)
    options = sync_options(config, max_parallel=max_parallel, timeout=timeout, retries=retries, settle=settle,
                           prompter=prompter if prompter is not None else TerminalPrompter())
    return (config.select(list(clusters) if clusters else None), str(download_dir),
            _chosen_progress(progress), options)


def sync_options(config: Config, *, max_parallel: int, timeout: float, retries: int, settle: float | None,
                 prompter: Prompter | None) -> SyncOptions:
    """The sync's settings as the CLI and the API make them: the settle window as
    ``SyncOptions.settle_for`` says, and the merge's reader as the check a changed file
    passes before it replaces a verified copy."""
    return SyncOptions(max_parallel=max_parallel, timeout=timeout, retries=retries,
                       settle=SyncOptions.settle_for(config, settle), prompter=prompter,
                       check_checkpoint=_checkpoint_problem)


def _checkpoint_problem(path: Path, name: str) -> str | None:
    from .merging.checkpoints import checkpoint_problem  # numpy: only when a verified copy is to be replaced

    return checkpoint_problem(path, name)


def _chosen_progress(progress: Progress | type | None) -> Progress:
    """``progress=`` as given: a Progress; a tqdm class (``tqdm.auto.tqdm``), drawing the bars; None: the default."""
    if progress is None:
        return _default_progress()
    if isinstance(progress, type) and not issubclass(progress, Progress):
        return TqdmProgress(sys.stderr, bar_class=progress)
    return progress


def merge(download_dir: PathLike = DEFAULT_DOWNLOAD_DIR, output: PathLike = DEFAULT_OUTPUT, *,
          dtype: str = "float32", expect_articles: int | None = None, strict: bool = False,
          articles_format: ArticlesFormat | None = None, shard_rows: int | None = None,
          clusters: Collection[str] | None = None, expect_rows: int | None = None, partial: bool = False,
          progress: Progress | type | None = None, break_lock: bool = False) -> MergeReport:
    """Merge the downloaded checkpoints into ``output``: a ``.pkl`` or ``.pickle`` path for the
    legacy pickle, any other path for a memory-mappable bundle directory.

    ``dtype``: the result's, "float32" or "float16". ``expect_articles``: fail unless the merge
    keeps exactly that many articles. ``strict``: NaN and Inf values are errors.
    ``articles_format``: a bundle's metadata shards, "parquet" (default), "jsonl" or
    "parquet-embeddings". ``shard_rows``: rows per shard of a bundle (default about 1 GiB of
    vectors each). ``clusters``: only these clusters' folders (default: all). ``expect_rows``:
    the run's total rows (the config's ``total_rows``). ``partial``: merge even with rows of
    the run missing, naming them. ``progress``: a ``Progress``, or a tqdm class to draw bars
    with; None: bars on a terminal, ``tqdm.auto`` in a notebook, else nothing.

    Holds the download directory's lock as a sync does: a merge never reads
    files a sync is still writing (``DownloadDirLockedError`` names the
    run). ``break_lock``: as ``--break-lock``.
    """
    from .merging.merge import merge_checkpoints

    progress = _chosen_progress(progress)
    try:
        with reading_lock(download_dir, "merge", break_lock=break_lock):
            return merge_checkpoints(download_dir, output, dtype=dtype, expect_articles=expect_articles,
                                     strict=strict, articles_format=articles_format, shard_rows=shard_rows,
                                     clusters=clusters, expect_rows=expect_rows, partial=partial,
                                     on_progress=lambda p: progress.rows_merged(p.rows_done, p.rows_total),
                                     on_read=lambda done, total: progress.step("merge: checkpoints read",
                                                                               done, total))
    finally:
        progress.close()


async def merge_async(download_dir: PathLike = DEFAULT_DOWNLOAD_DIR, output: PathLike = DEFAULT_OUTPUT,
                      **options: Any) -> MergeReport:
    """:func:`merge` on a worker thread, so that the caller's event loop goes on; the same keywords."""
    return await anyio.to_thread.run_sync(lambda: merge(download_dir, output, **options))


def _default_progress() -> Progress:
    """Bars on a terminal; in a notebook (its kernel loaded, no terminal), bars through
    ``tqdm.auto`` (widgets); nothing elsewhere (a log, a service: a running event loop
    alone is not a notebook, and bars there would fill the log)."""
    if sys.stderr.isatty():
        return TqdmProgress(sys.stderr)
    if "ipykernel" in sys.modules:
        from tqdm.auto import tqdm

        return TqdmProgress(sys.stderr, bar_class=tqdm)
    return QuietProgress(sys.stderr)

