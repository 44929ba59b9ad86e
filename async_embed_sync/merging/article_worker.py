"""A bundle's article lines parsed, and written into its metadata shards, in one worker process beside the merge.

- The merge process never parses a bundle's JSON lines nor imports pyarrow:
  parsing holds the GIL (here it runs on the other core), and what it
  allocates stays out of the merge's resident size (one block of rows).
- The worker is sent paths and byte spans, never bytes: it reads the files itself.
- It reports the first problem at :meth:`ArticleWorker.finish`, and keeps
  draining the tasks sent after it: the parent never blocks on a full pipe.
- It is a fresh interpreter (``python -c``) that inherits only its end of the
  pipe: a fork would copy locks that the parent's other threads held, and its
  signal handlers; multiprocessing's "spawn" would run the caller's main
  script again, failing a script without an ``if __name__ == "__main__"`` guard.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import sys
from collections.abc import Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError, LocalFileError, OutputError
from .jsonl_index import parse_jsonl_span

if TYPE_CHECKING:
    from ..output.forms import ArticlesFormat
    from ..output.shards import ShardPlan

# How long a worker is given to end, after its pipe is closed or after SIGTERM.
_STOP_SECONDS = 5.0

# The worker's main: argv is (where this package is found, its pipe's descriptor).
# Ctrl-C reaches the whole process group: the parent decides what stops, and
# stops the worker with SIGTERM, whatever handler it inherited. Set first,
# before the imports, so that a Ctrl-C while they run leaves no traceback.
# The folder that holds the package, for the worker's sys.path.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[len(__name__.split(".")) - 1])
_WORKER_MAIN = f"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.path.insert(0, sys.argv[1])
from {__name__} import _serve
from multiprocessing.connection import Connection
_serve(Connection(int(sys.argv[2])))
"""

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

    The process starts when this object is made, and imports its modules
    while the caller goes on. Use as a context manager: leaving it stops the
    worker at once, and never waits on it for long.
    """

    def __init__(self) -> None:
        self._connection, child = multiprocessing.Pipe()
        with child:
            try:
                self._process = subprocess.Popen(
                    [sys.executable, "-c", _WORKER_MAIN, _PACKAGE_ROOT, str(child.fileno())],
                    pass_fds=[child.fileno()], stdin=subprocess.DEVNULL,
                    # Signals ignored here stay ignored there, as across a fork
                    # (a merge under RLIMIT_FSIZE with SIGXFSZ ignored gets EFBIG).
                    restore_signals=False,
                )
            except OSError as exc:  # out of processes or memory
                self._connection.close()
                raise OutputError("articles", f"the worker process that writes them cannot start ({exc}).") from exc
        self._finished: list[tuple[int, str]] | None = None  # the shards, once finished

    @property
    def process(self) -> subprocess.Popen:
        """The worker process, for whoever watches it from outside (its pid, its exit status)."""
        return self._process

    def write_metadata(self, directory: Path, plan: ShardPlan, articles_format: ArticlesFormat,
                       group_rows: int) -> None:
        """Write the rows of every span submitted from now on into the metadata shards of ``plan`` in
        ``directory`` (see ``output/metadata_shards.py``)."""
        self._connection.send(("metadata", directory, plan, articles_format, group_rows))

    def survey(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None:
        """Parse every line of ``spans`` of ``path`` (as :meth:`submit` has them) for the keys and kinds of
        values of the articles, which then make the columns of the parquet shards."""
        self._connection.send(("survey", path, list(spans), source or path))

    def submit(self, path: Path, spans: Iterable[tuple[int, int, int]], source: Path | None = None) -> None:
        """Parse every line of ``spans`` of ``path``: ``(offset, length, number of its first line)``.

        Problems name ``source`` (default ``path``): the checkpoint the lines come from.
        """
        self._connection.send(("parse", path, list(spans), source or path))

    def finish(self) -> list[tuple[int, str]]:
        """Wait for every span to be parsed and the metadata shards closed; each shard's (rows, sha256).

        Raises the first problem: :class:`CheckpointError` for a line that is
        not a JSON object, or rows that do not fit the parquet columns;
        :class:`OutputError` or :class:`LocalFileError` if a shard cannot be
        written. Later calls return the same shards (none after a problem) at once.
        """
        if self._finished is not None:
            return self._finished
        self._finished = []
        try:
            self._connection.send(None)
            problem, shards = self._connection.recv()
        except (EOFError, OSError) as exc:
            raise OutputError("articles", "the worker process that writes them ended unexpectedly.") from exc
        if problem is not None:
            error, path, text = problem
            raise _ERRORS[error](path, text)
        self._finished = shards
        return shards

    def close(self) -> None:
        """Stop the worker and reap it (its resource usage then counts as this process's child's)."""
        if self._finished is None:
            self._process.terminate()  # its work is wanted no more, not even the end of a span
        # A worker waiting for its next task ends at the end of its pipe.
        self._connection.close()
        try:
            self._process.wait(_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            # A SIGTERM ignored (inherited so until the worker sets its own
            # handlers), or a worker that hangs.
            self._process.kill()
            # Past this, it is stuck in the kernel: nothing more can be done.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(_STOP_SECONDS)

    def __enter__(self) -> ArticleWorker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _serve(connection: Connection) -> None:
    # Only the parent holds the other end: its death (even by SIGKILL) ends
    # the pipe, and this process with it.
    try:
        _serve_until_finished(connection)
    except (EOFError, BrokenPipeError):
        pass


def _serve_until_finished(connection: Connection) -> None:
    from ..output.metadata_shards import ArticleKeys, MetadataShards

    keys = ArticleKeys()
    writer = None
    problem = None
    shards: list[tuple[int, str]] = []
    while (task := connection.recv()) is not None:
        if problem is not None:
            continue  # the parent hears of the first problem when it finishes
        try:
            if task[0] == "metadata":
                writer = MetadataShards(*task[1:], keys=keys)
            else:
                kind, path, spans, source = task
                for offset, length, first_line in spans:
                    for rows in parse_jsonl_span(path, offset, length, first_line, source):
                        if kind == "survey":
                            keys.add(rows, source)
                        elif writer is not None:
                            writer.add(rows, source)
        except Exception as exc:
            problem = _problem(exc)
    if problem is None and writer is not None:
        try:
            shards = writer.close()
        except Exception as exc:
            problem = _problem(exc)
    connection.send((problem, shards))
