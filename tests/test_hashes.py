"""The remote-hash batcher (``transfer/hashes.py``) over a scripted connection."""

from __future__ import annotations

import hashlib
import shlex
from types import SimpleNamespace

import pytest

from async_embed_sync.transfer import hashes
from async_embed_sync.transfer.hashes import Sha256Batcher

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


class _Connection:
    """Answers ``sha256sum -- paths`` with the sha256 of each path's name."""

    def __init__(self):
        self.commands: list[list[str]] = []

    async def run(self, command: str, check: bool = False):
        paths = shlex.split(command)[2:]
        self.commands.append(paths)
        out = "".join(f"{hashlib.sha256(p.encode()).hexdigest()}  {p}\n" for p in paths)
        return SimpleNamespace(exit_status=0, stdout=out)

    def is_closed(self) -> bool:
        return False


async def test_prefetched_hashes_are_batched_by_bytes_and_each_taken_once():
    connection = _Connection()
    batcher = Sha256Batcher(connection, workers=1)
    sizes = {f"/d/big{i}.pkl": hashes.HASH_BATCH_BYTES // 2 for i in range(4)}
    sizes.update({f"/d/small{i}.pkl": 1000 for i in range(10)})
    for path, size in sizes.items():
        batcher.prefetch(path, size)
    for path in sizes:
        assert await batcher.sha256(path) == hashlib.sha256(path.encode()).hexdigest()
    # No batch holds more than HASH_BATCH_BYTES of files (a single file may exceed it alone).
    for batch in connection.commands:
        assert sum(sizes[p] for p in batch) <= hashes.HASH_BATCH_BYTES or len(batch) == 1
    assert sorted(p for batch in connection.commands for p in batch) == sorted(sizes)
    # Taken once: asking again (a retry after a change on the server) runs a fresh hash.
    before = len(connection.commands)
    await batcher.sha256("/d/small0.pkl")
    assert len(connection.commands) == before + 1
    batcher.close()


async def test_a_batch_keeps_its_command_line_short():
    connection = _Connection()
    batcher = Sha256Batcher(connection, workers=1)
    paths = [f"/d/{'x' * 300}{i}.pkl" for i in range(hashes.HASH_BATCH)]
    for path in paths:
        batcher.prefetch(path)
    for path in paths:
        await batcher.sha256(path)
    assert len(connection.commands) > 1
    for batch in connection.commands:
        assert sum(len(p) + 3 for p in batch) <= hashes.HASH_COMMAND_CHARS
    batcher.close()
