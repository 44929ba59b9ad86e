"""An asyncio event loop in a daemon thread, for synchronous code that hosts
servers (the demo, the benchmarks) while its own thread runs the tool."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
STOP_TIMEOUT = 10.0


class BackgroundLoop:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = 60.0) -> T:
        """Run ``coroutine`` on the background loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)


async def _end_what_is_left() -> None:
    """What ``asyncio.run`` does before it closes its loop: every task still
    pending is cancelled and awaited, async generators are finalised, and the
    default executor's threads are joined. A task left pending is reported by
    asyncio ("Task was destroyed but it is pending!") when it is collected."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # observed: nobody waits for it any more
    loop = asyncio.get_running_loop()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(loop.shutdown_asyncgens(), STOP_TIMEOUT)
        await asyncio.wait_for(loop.shutdown_default_executor(), STOP_TIMEOUT)


@contextlib.contextmanager
def background_loop(name: str = "background-loop") -> Iterator[BackgroundLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
    thread.start()
    try:
        yield BackgroundLoop(loop)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_end_what_is_left(), loop).result(2 * STOP_TIMEOUT + 1)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()
