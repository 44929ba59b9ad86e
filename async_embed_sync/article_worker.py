"""Article rows parsed in a worker process beside the merge: checked, and written to ``articles.parquet``.

A bundle's articles are never parsed by the merge process itself: its
``articles.jsonl`` takes the lines of ``.jsonl`` checkpoints verbatim, and
its ``articles.parquet`` needs them parsed and converted. Both are done
here, in one forked process, for two reasons:

- parsing JSON and building Arrow tables hold the GIL: on a thread they
  would take turns with the merge's copy; in a process they run on the
  other core;
- what they allocate (pyarrow, its memory pool, a row group of dicts) stays
  out of the merge process, whose resident size is then bounded by one block
  of rows, whatever the output form.

The worker is given file paths and byte spans, never the bytes: the
messages stay small, and it reads the files itself. It reports the first
problem when asked to :meth:`~ArticleWorker.finish`, and keeps reading (and
ignoring) the tasks sent after it, so the parent never blocks on a full pipe.
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path

from .checkpoints import parse_jsonl_span
from .errors import CheckpointError, LocalFileError, OutputError

# A problem crosses the process boundary as (error class name, path, problem).
_ERRORS = {cls.__name__: cls for cls in (CheckpointError, LocalFileError, OutputError)}


def _problem(exc: Exception) -> tuple[str, str, str]:
    for name, cls in _ERRORS.items():
        if isinstance(exc, cls):
            return (name, exc.path, exc.problem)
    # A bug, or memory exhausted: still one line for the user, not a traceback from the worker.
    return ("OutputError", "articles", f"the worker process that writes them failed ({exc!r}).")


class ArticleWorker:
    """One worker process that parses the JSON lines of byte spans, and writes them to parquet if asked.

    The process is forked when this object is made: make it before large
    buffers exist (the fork shares them, and they would count in the
    worker's resident size too). Use as a context manager: leaving it stops
    the worker at once.
    """

    def __init__(self) -> None:
        context = multiprocessing.get_context("fork")
        self._connection, child = context.Pipe()
        self._process = context.Process(
            target=_serve, args=(child, self._connection), name="async_embed_sync articles", daemon=True
        )
        self._process.start()
        child.close()
        self._finished = False

    def write_parquet(self, path: Path, group_rows: int) -> None:
        """Write the rows of every span submitted from now on to a new parquet file at ``path``."""
        self._connection.send(("parquet", path, group_rows))

    def submit(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None:
        """Parse every line of ``spans`` of ``path``: ``(offset, length, number of its first line)``.

        Problems name ``source`` (default ``path``): the checkpoint the lines come from.
        """
        self._connection.send(("parse", path, list(spans), source or path))

    def finish(self) -> None:
        """Wait for every span to be parsed and the parquet file closed; raise the first problem.

        :class:`CheckpointError` for a line that is not a JSON object, or
        rows that do not fit the parquet table; :class:`OutputError` if the
        parquet file cannot be written. Later calls return at once.
        """
        if self._finished:
            return
        self._finished = True
        try:
            self._connection.send(None)
            problem = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise OutputError("articles", "the worker process that writes them ended unexpectedly.") from exc
        if problem is not None:
            error, path, text = problem
            raise _ERRORS[error](path, text)

    def close(self) -> None:
        # Reaped, not only killed: its resource usage then counts as the parent's child's.
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._connection.close()

    def __enter__(self) -> ArticleWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _leave_signals_to_the_parent() -> None:
    # Ctrl-C reaches the whole process group: the parent decides what stops,
    # and stops the worker with SIGTERM, whatever handler it had inherited.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _serve(connection: Connection, parent_end: Connection) -> None:
    # The fork copied the parent's end too: closed here, so that the
    # parent's death (even by SIGKILL) ends the pipe, and this process with it.
    parent_end.close()
    _leave_signals_to_the_parent()
    try:
        _serve_until_finished(connection)
    except (EOFError, BrokenPipeError):
        pass


def _serve_until_finished(connection: Connection) -> None:
    writer = None
    problem = None
    while (task := connection.recv()) is not None:
        if problem is not None:
            continue  # the parent hears of the first problem when it finishes
        try:
            if task[0] == "parquet":
                from .output import ParquetRowWriter

                writer = ParquetRowWriter(task[1], task[2])
            else:
                _, path, spans, source = task
                for offset, length, first_line in spans:
                    for rows in parse_jsonl_span(path, offset, length, first_line, source):
                        if writer is not None:
                            writer.add(rows, source)
        except Exception as exc:
            problem = _problem(exc)
    if problem is None and writer is not None:
        try:
            writer.close()
        except Exception as exc:
            problem = _problem(exc)
    connection.send(problem)
