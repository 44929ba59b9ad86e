"""SIGTERM stops a command as Ctrl-C does, whatever SIGINT's disposition.

A scheduler, ``kill`` or a container runtime stops the tool with SIGTERM. A
job that a non-interactive shell starts with ``cmd &`` has SIGINT ignored
(POSIX; children inherit it), so SIGTERM cannot be passed on as a SIGINT:
it is handled itself.

- In synchronous code (the merge, the glue around the sync), the handler
  raises :class:`~.errors.Terminated` where the main thread is, as Python
  raises ``KeyboardInterrupt`` on Ctrl-C; the merge cleans up on any
  exception.
- While an event loop runs (the sync, ``status``), an exception raised at an
  arbitrary point could split what must move together (the bytes written,
  their hash, the verified offset). The handler cancels the loop's main task
  instead, as asyncio does on Ctrl-C: every shielded step finishes, every
  cleanup runs, and :class:`~.errors.Terminated` is raised once the loop is done.

Only the first SIGTERM stops; later ones are ignored while the cleanup runs
(SIGKILL still ends the process at once, and the next run resumes).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .errors import Terminated

T = TypeVar("T")


class _StopOnSigterm:
    """The SIGTERM handler while a command runs."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.received:
            self.received = True
            raise Terminated()

    def raise_if_received(self) -> None:
        if self.received:
            raise Terminated()


def _in_main_thread() -> bool:
    # Python runs signal handlers, and lets them be set, in the main thread only.
    return threading.current_thread() is threading.main_thread()


def stop_on_sigterm() -> Callable[[], None]:
    """From now on, SIGTERM stops the command (see the module); returns how to put
    back the handler found, so that a library caller or a test calling
    ``main(argv)`` is not left with this one. Outside the main thread, nothing changes."""
    if not _in_main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _StopOnSigterm())
    # None: a handler set outside Python, which cannot be put back from here.
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_stoppable(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``anyio.run(func, *args)`` on asyncio; once :func:`stop_on_sigterm` is in effect, SIGTERM
    cancels its main task and :class:`~.errors.Terminated` is raised once the loop is done."""
    stop = signal.getsignal(signal.SIGTERM)
    if not isinstance(stop, _StopOnSigterm) or not _in_main_thread():
        return anyio.run(func, *args, backend="asyncio")
    try:
        result = anyio.run(_main_task_cancelled_on_sigterm, stop, func, args, backend="asyncio")
    except BaseException:
        # Whatever the cancellation ended in (CancelledError, an error raised
        # while the tasks unwound), the command was asked to stop.
        stop.raise_if_received()
        raise
    # A SIGTERM that came as the loop finished still stops the command: `run` must not go on to merge.
    stop.raise_if_received()
    return result


async def _main_task_cancelled_on_sigterm(stop: _StopOnSigterm, func: Callable[..., Awaitable[T]],
                                          args: tuple[Any, ...]) -> T:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def cancel_main(signum: int, frame: object) -> None:
        if not stop.received:
            stop.received = True
            # As a callback of the loop, not from inside whatever the loop was doing.
            loop.call_soon_threadsafe(main.cancel)

    signal.signal(signal.SIGTERM, cancel_main)
    try:
        return await func(*args)
    finally:
        signal.signal(signal.SIGTERM, stop)
