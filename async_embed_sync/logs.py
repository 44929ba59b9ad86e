"""Logs on demand, through the standard ``logging`` module.

The package logs under the ``async_embed_sync`` logger: warnings (a missing
``IdentityFile``, a host key recorded by accept-new) always reach the user;
``-v`` adds what the tool decides (connections, the method, retries,
reconnects, how each file was verified); ``--debug`` adds asyncssh's own
debug log. To stderr, or with ``--log-file`` to that file as well.

No message carries a secret: passwords and passphrases never enter a log
call, and asyncssh does not log them at any debug level (``test_secrets``
checks every level).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import NOTHING_CHANGED, translating_local_errors

PACKAGE_LOGGER = "async_embed_sync"
TIMESTAMPED = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# As the plain progress lines write it, so that the two interleave readably.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"
# Without -v, only warnings, said as OpenSSH says them ("Warning: Permanently added ...").
PLAIN = "Warning: %(message)s"


class _LogFile(logging.FileHandler):
    """A ``FileHandler`` that stays closed.

    ``FileHandler`` in append mode reopens its file when a record arrives
    after ``close()``. One can: another thread may have taken the logger's
    handler list just before ``restore()`` swapped it (an in-process server
    in the same interpreter, a library caller's threads). That reopened file
    is then never closed. Late records are dropped instead; ``emit`` runs
    under the handler's lock, as ``close`` does, so the flag cannot race.
    """

    def __init__(self, filename: str) -> None:
        super().__init__(filename, encoding="utf-8")
        self._stays_closed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self._stays_closed:
            super().emit(record)

    def close(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._stays_closed = True
            super().close()


def configure_logging(verbosity: int = 0, log_file: str | None = None) -> Callable[[], None]:
    """``verbosity``: 0 warnings, 1 (-v) decisions, 2 (--debug) asyncssh's debug log too.

    Returns how to put the loggers back as they were, so that a library
    caller or a test calling ``main(argv)`` is not left with these handlers.
    """
    package = logging.getLogger(PACKAGE_LOGGER)
    asyncssh_logger = logging.getLogger("asyncssh")
    saved = [(logger, logger.level, logger.propagate, list(logger.handlers)) for logger in (package, asyncssh_logger)]
    # A log file gets the decisions even without -v; stderr then only the warnings.
    level = logging.DEBUG if verbosity >= 2 else logging.INFO if verbosity == 1 or log_file else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setFormatter(logging.Formatter(PLAIN if verbosity <= 0 else TIMESTAMPED, TIMESTAMP_FORMAT))
    handlers[0].setLevel(logging.WARNING if verbosity <= 0 else logging.NOTSET)
    if log_file is not None:
        with translating_local_errors(Path(log_file), "write the log file", NOTHING_CHANGED):
            handlers.append(_LogFile(log_file))
        handlers[-1].setFormatter(logging.Formatter(TIMESTAMPED, TIMESTAMP_FORMAT))
    package.setLevel(level)
    package.propagate = False
    # asyncssh logs its connections at INFO: shown with --debug only.
    asyncssh_logger.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
    asyncssh_logger.propagate = False
    for logger in (package, asyncssh_logger):
        logger.handlers = list(handlers)

    def restore() -> None:
        # The loggers first, so that no new record reaches a handler being closed.
        for logger, old_level, old_propagate, old_handlers in saved:
            logger.setLevel(old_level)
            logger.propagate = old_propagate
            logger.handlers = old_handlers
        for handler in handlers:
            handler.close()

    return restore
