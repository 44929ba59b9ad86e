"""Pipelined SFTP reads, handed out in order: blocks that arrived together
come out as one chunk (one write for several blocks), and a block that
failed is raised only once everything before it has been handed out.

The SFTP channel here is a fake at asyncssh's seam (what ``SftpFiles`` is
given: channels with ``limits``, ``open`` and files with ``read``/``stat``/
``close``), so the order in which blocks are answered is the test's to pick.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from async_embed_sync.config import ClusterConfig
from async_embed_sync.transfer.sftp_files import CHUNK_BYTES, SftpFiles

pytestmark = pytest.mark.anyio

BLOCK = 64 * 1024


class _File:
    """Answers each read when the test says so (``answer``), from ``data``; ``fail`` raises at its offset."""

    def __init__(self, data: bytes, fail_at: int | None = None):
        self.data, self.fail_at = data, fail_at
        self.pending: dict[int, asyncio.Future] = {}
        self.closed = False

    async def read(self, size: int, offset: int) -> bytes:
        self.pending[offset] = answer = asyncio.get_running_loop().create_future()
        await answer
        if offset == self.fail_at:
            raise ConnectionResetError("injected")
        return self.data[offset:offset + size]

    def answer(self, *offsets: int) -> None:
        for offset in offsets:
            self.pending.pop(offset).set_result(None)

    async def stat(self):
        return SimpleNamespace(size=len(self.data), mtime=1)

    async def close(self) -> None:
        self.closed = True


class _Channel:
    def __init__(self, file: _File):
        self.limits = SimpleNamespace(max_read_len=BLOCK)
        self._file = file

    async def open(self, path, mode, block_size):
        return self._file


def _files(file: _File, read_ahead: int) -> SftpFiles:
    connection = SimpleNamespace(get_extra_info=lambda key, default=None: "SSH-2.0-OpenSSH_9.2")
    cluster = ClusterConfig(name="tensor01", host="h", port=22, username="u", remote_dir="/ckpt")
    return SftpFiles(connection, [_Channel(file)], cluster, read_ahead=read_ahead)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_blocks_that_arrived_together_come_as_one_chunk_up_to_the_chunk_size():
    blocks = 2 * CHUNK_BYTES // BLOCK
    file = _File(bytes(range(256)) * (blocks * BLOCK // 256))
    files = _files(file, read_ahead=blocks * BLOCK)
    got = []
    async with files.read("a.pkl", 0, len(file.data)) as read:
        chunks = read.chunks()
        pending = asyncio.ensure_future(chunks.__anext__())
        await _settle()
        file.answer(*sorted(file.pending))  # every block at once
        while True:
            got.append(await pending)
            if sum(map(len, got)) == len(file.data):
                break
            pending = asyncio.ensure_future(chunks.__anext__())
            await _settle()
            file.answer(*sorted(file.pending))
    assert b"".join(got) == file.data
    assert [len(chunk) for chunk in got] == [CHUNK_BYTES, CHUNK_BYTES]  # 32 blocks, two writes
    await _settle()
    assert file.closed


async def test_a_failed_block_is_raised_after_every_block_before_it_is_handed_out():
    file = _File(bytes(8 * BLOCK), fail_at=5 * BLOCK)
    files = _files(file, read_ahead=8 * BLOCK)
    handed_out = 0
    with pytest.raises(ConnectionResetError):
        async with files.read("a.pkl", 0, len(file.data)) as read:
            chunks = read.chunks()
            pending = asyncio.ensure_future(chunks.__anext__())
            await _settle()
            file.answer(*sorted(file.pending))  # blocks 0-7 answered together, block 5 failed
            while True:
                handed_out += len(await pending)
                pending = asyncio.ensure_future(chunks.__anext__())
    assert handed_out == 5 * BLOCK  # blocks 0-4: what arrived in order before the failure is kept
