"""A sha256 computed on a worker thread, fed the bytes of arrays without a copy."""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np


def as_bytes(data: Any) -> Any:
    """The bytes of a C-contiguous array as a flat uint8 view (never a copy); any other ``data`` as it is.

    The buffer protocol refuses some dtypes (a big-endian longdouble); a view as uint8 does not.
    """
    if not isinstance(data, np.ndarray):
        return data
    if not data.flags.c_contiguous:
        raise ValueError("not a C-contiguous array")  # its copy would be read into, or hashed, instead
    return data.view(np.uint8).reshape(-1)


class BackgroundDigest:
    """A sha256 fed in order on a worker thread, so that hashing overlaps other work.

    hashlib releases the GIL on large buffers: the hashing runs on another
    core while the caller copies and measures. A buffer passed to
    :meth:`update` must stay unchanged until :meth:`wait` returns.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._worker = ThreadPoolExecutor(max_workers=1)
        self._pending: list[Future[None]] = []

    def update(self, data: Any) -> None:
        self._pending.append(self._worker.submit(self._digest.update, as_bytes(data)))

    def wait(self) -> None:
        """Block until every buffer given so far is hashed."""
        pending, self._pending = self._pending, []
        for update in pending:
            update.result()

    def hexdigest(self) -> str:
        self.wait()
        self._worker.shutdown()
        return self._digest.hexdigest()

    def close(self) -> None:
        """Give up: drop what is not hashed yet and stop the worker (its thread is joined)."""
        for update in self._pending:
            update.cancel()
        self._worker.shutdown(wait=True)

    def __enter__(self) -> BackgroundDigest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

