"""The legacy pickle: the legacy dict as one pickle stream, assembled opcode by opcode.

Its rows have a known place in the file, :data:`ROWS_OFFSET`, known before
its size: they are written there as they arrive (or were already, in the
scratch rows file that becomes the output), while the articles are appended
after them; nothing is staged twice. It loads with plain ``pickle.load``
under any numpy from 1.23.2 (the first for Python 3.11) to 2.x, whichever
numpy wrote it: numpy's objects in it are named as numpy 1.x named them
(:data:`_RECONSTRUCT`, ``numpy.ndarray``, ``numpy.dtype``), never ``numpy._core``.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..merging.checkpoints import NpyCheckpoint
from ..merging.row_blocks import RowBlock
from ..merging.rows import python_values
from .files import EmbeddingsRegion, PreallocatedFile, append_copied
from .forms import LEGACY_KEYS
from .scratch import Scratch, ScratchFile, StagedCheckpoint
from .writer import OutputWriter


class _NumpyScalarFound(Exception):
    pass


# numpy's own name for the function that rebuilds a pickled array, as every
# numpy loads it: numpy 2 writes ``numpy._core.multiarray``, a module numpy
# 1.25 and older do not have, and keeps ``numpy.core.multiarray._reconstruct``
# loadable without a warning, for the pickles numpy 1.x wrote.
_RECONSTRUCT = pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n"


def _array_reduce(array: np.ndarray) -> tuple[Any, ...]:
    """An array in a row, rebuilt by ``numpy.ndarray``: the reduce numpy 2 gives names ``numpy._core``.

    ``ndarray((0,))`` then ``__setstate__`` with numpy's own state is what
    ``_reconstruct`` does: the same writable array, under any numpy. The
    items of an object array are written as :func:`_pickle_body` writes any
    value (a numpy scalar among them as the Python scalar of its value).
    """
    _, _, state = np.ndarray.__reduce__(array)
    if array.dtype.hasobject:
        state = (*state[:4], python_values(state[4]))
    return np.ndarray, ((0,),), state


class _PlainValuesPickler(pickle.Pickler):
    # Still the C pickler: it asks reducer_override only about objects that
    # are not plain Python values, so rows without numpy values cost nothing more.
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, np.generic):
            raise _NumpyScalarFound
        if isinstance(obj, np.ndarray):
            return _array_reduce(obj)
        return NotImplemented


def _pickle_body(value: Any) -> bytes:
    """The opcodes that push ``value``, without the protocol header and STOP.

    Protocol 3 has no frames, so such bodies can be laid end to end inside
    a larger stream; no memo (``fast``), so none refers to another. A numpy
    scalar in ``value`` is written as the Python scalar of its value, as a
    bundle's JSON has it, and an array as :func:`_array_reduce` rebuilds it:
    the output loads the same under any numpy, and an ``np.int64`` id stays
    an ``int``.
    """
    stream = io.BytesIO()
    pickler = _PlainValuesPickler(stream, protocol=3)
    pickler.fast = True  # also several times faster on many small dicts
    try:
        pickler.dump(value)
    except _NumpyScalarFound:
        return _pickle_body(python_values(value))
    data = stream.getvalue()
    return data[2:-1]


class PickledArticles:
    """The article list of the legacy pickle: APPENDS batches written after an EMPTY_LIST, block by block."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._stream.write(pickle.EMPTY_LIST)

    @staticmethod
    def encode(block: RowBlock) -> bytes:
        """The bytes that :meth:`add_block` appends for ``block``."""
        rows = block.article_rows()
        # A pickled list's body is EMPTY_LIST then its APPEND(S): without the
        # EMPTY_LIST, the rows append to the list already on the stack.
        return _pickle_body(rows)[1:] if rows else b""

    def add_block(self, block: RowBlock) -> None:
        self._stream.write(self.encode(block))

    def add_lines(self, checkpoint: NpyCheckpoint) -> None:
        pass  # its articles came with its blocks

    def add_encoded(self, scratch: ScratchFile, offset: int, length: int, source: Path) -> None:
        """Append ``length`` bytes made by :meth:`encode` from the rows of ``source``, at ``offset`` of ``scratch``."""
        append_copied(self._stream, scratch.fd, [(offset, length)])

    def finish(self) -> None:
        pass  # the writer closes the stream

    def close(self) -> None:
        pass


# The rows' bytes are memo entry 0 of the legacy pickle; nothing else in it is memoized.
_ROWS_MEMO = bytes([0])

# The legacy pickle's rows start at a multiple of this in the file: mapped by
# load(), they are then aligned for any float dtype (an unaligned array is
# copied by many numpy and BLAS operations).
_ROWS_ALIGNMENT = 64


def _legacy_pickle_head(nbytes: int) -> bytes:
    """The legacy pickle up to its ``nbytes`` of rows, which follow; its length does not depend on ``nbytes``.

    The rows come first, as one bytes payload: the array made of them can be
    described only once its shape is known (see :func:`_legacy_pickle_array`).
    """
    start = pickle.PROTO + bytes([4])  # BINBYTES8, for rows beyond 4 GiB
    rows = pickle.BINBYTES8 + struct.pack("<Q", nbytes)
    # Padding that puts the rows at their alignment: a bytes value, pushed and dropped.
    padding = -(len(start) + 3 + len(rows)) % _ROWS_ALIGNMENT
    return start + pickle.SHORT_BINBYTES + bytes([padding]) + bytes(padding) + pickle.POP + rows


def _legacy_pickle_array(shape: tuple[int, int], dtype: np.dtype) -> bytes:
    """What follows the rows: they are memoized and dropped, then the dict opens with the array made of them.

    The array is rebuilt as numpy 1.x's ``ndarray.__reduce_ex__(4)``
    describes one: :data:`_RECONSTRUCT` of ``(numpy.ndarray, (0,), b'b')``,
    then ``__setstate__`` with the state ``(1, shape, dtype, False, rows)``.
    The names are written as numpy 1.x wrote them, not taken from the
    installed numpy: numpy 2's are ``numpy._core.multiarray._reconstruct``
    here and ``numpy._core.numeric._frombuffer`` in protocol 5, which numpy
    1.25 and older cannot load.
    """
    return b"".join(
        [
            pickle.BINPUT + _ROWS_MEMO,
            pickle.POP,
            pickle.EMPTY_DICT,
            pickle.MARK,
            _pickle_body("embeddings"),
            _RECONSTRUCT,
            _pickle_body((np.ndarray, (0,), b"b")),
            pickle.REDUCE,
            pickle.MARK,
            _pickle_body(1),
            _pickle_body(tuple(int(size) for size in shape)),
            _pickle_body(np.dtype(dtype)),
            _pickle_body(False),
            pickle.BINGET + _ROWS_MEMO,
            pickle.TUPLE,
            pickle.BUILD,
        ]
    )


# Where the rows start in the file, whatever their size: the scratch rows
# file of legacy checkpoints starts them there too (see output/scratch.py).
ROWS_OFFSET = len(_legacy_pickle_head(0))


class LegacyPickleWriter(OutputWriter):
    """The legacy dict, one pickle stream written in one pass, loadable with plain ``pickle.load``.

    Layout (protocol 4, no frames)::

        <padding> BINBYTES8 <rows> -> memo 0
        {'embeddings': numpy.core.multiarray._reconstruct(numpy.ndarray, (0,), b'b')
                       + __setstate__((1, shape, numpy.dtype(...), False, memo 0)),
         'articles': [APPENDS batches ...], 'total_articles': ..., ...}

    which is what ``pickle.dump`` of the legacy merge's array gave (protocol
    4, numpy 1.x), so it loads as a writable ndarray as that one did, under
    any numpy from 1.23.2 to 2.x, whichever numpy writes it: no name in it
    is ``numpy._core``, the articles' and other values' included (see
    :func:`_pickle_body`). The array bytes sit at a known offset: rows are
    written there as they come while the articles are appended after the
    array, so nothing is staged twice.

    Where the scratch rows file already holds every row, in order, from
    :data:`ROWS_OFFSET` (the legacy checkpoints ``staged`` there, in index
    order, were all there is), it becomes this output, and only what
    precedes and follows the rows is written.
    """

    def __init__(
        self, path: Path, shape: tuple[int, int], dtype: np.dtype, scratch: Scratch,
        staged: Sequence[StagedCheckpoint] = (),
    ):
        dtype = np.dtype(dtype)
        self.path = path
        self.scratch = scratch
        nbytes = shape[0] * shape[1] * dtype.itemsize
        head = _legacy_pickle_head(nbytes)
        tail = _legacy_pickle_array(shape, dtype)
        rows_in_place = scratch.rows_in_place(staged, nbytes)
        if rows_in_place is not None:
            os.replace(rows_in_place, path)
        self._file = PreallocatedFile(path, len(head) + nbytes, keep_contents=rows_in_place is not None)
        self._file.write_at(head, 0)
        self.embeddings = EmbeddingsRegion(self._file, len(head), shape, dtype)
        self._stream = open(path, "r+b")
        self._stream.seek(len(head) + nbytes)
        self._stream.write(tail + _pickle_body("articles"))
        self.articles = PickledArticles(self._stream)

    def finish(self, metadata: Mapping[str, Any]) -> None:
        """Write the remaining keys (every legacy key but the first two) and close."""
        self.embeddings.check_complete()
        for key in LEGACY_KEYS[2:]:
            self._stream.write(_pickle_body(key) + _pickle_body(metadata[key]))
        self._stream.write(pickle.SETITEMS + pickle.STOP)
        self.close()

    def close(self) -> None:
        self._stream.close()
        self._file.close()



# How much of a pickle :func:`is_merged_result` reads, payloads skipped, before it gives up.
_RECOGNISE_BYTES = 1 << 16
_RECOGNISE_OPCODES = 4096
# A string opcode's argument read to see whether it is a key; longer ones are skipped.
_KEY_BYTES = 64
_MARK = object()


def _first_keys(stream: Any, wanted: Sequence[str]) -> list[str]:
    """The first keys of the dict a pickle stream holds at its top, as far as they are ``wanted``
    and can be told cheaply: fewer (or none) if the top object is no dict, its first key is
    not ``wanted[0]``, or the next ones are too far in. A key after the first is told by its
    name: a string pushed where the dict's next key may go (a value's own parts on the stack
    may look the same, but none of a result's is such a name), after a first value that asks
    for numpy first (the result's embeddings are an array).

    Walks the opcodes with :mod:`pickletools`' own table, keeping only a token per stack entry:
    payloads (an array's bytes, long strings) are skipped with a seek, never read, so a 2 GB
    result costs a few reads. Both this tool's writer (its rows before the dict, see
    :class:`LegacyPickleWriter`) and ``pickle.dump`` of a dict (any protocol) open the dict
    with its first keys.
    """
    import pickletools

    stack: list[Any] = []
    top_dict = object()
    keys: list[str] = []
    first_global: str | None = None
    read = 0
    for _ in range(_RECOGNISE_OPCODES):
        code = stream.read(1)
        read += 1
        if not code or read > _RECOGNISE_BYTES:
            return keys
        op = pickletools.code2op.get(code.decode("latin-1"))
        if op is None:
            return keys
        value: Any = None
        if op.arg is not None:
            n = op.arg.n
            if n == pickletools.UP_TO_NEWLINE:
                # One line, or two (GLOBAL's module and name), each bounded.
                lines = [stream.readline(_KEY_BYTES * 8) for _ in range(op.arg.name.count("pair") + 1)]
                read += sum(map(len, lines))
                if not all(line.endswith(b"\n") for line in lines):
                    return keys
                try:
                    value = op.arg.reader(io.BytesIO(b"".join(lines)))
                except ValueError:
                    return keys
            elif n in (pickletools.TAKEN_FROM_ARGUMENT1, pickletools.TAKEN_FROM_ARGUMENT4,
                       pickletools.TAKEN_FROM_ARGUMENT4U, pickletools.TAKEN_FROM_ARGUMENT8U):
                width = {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT8U: 8}.get(n, 4)
                size_bytes = stream.read(width)
                read += width
                if len(size_bytes) != width:
                    return keys
                length = int.from_bytes(size_bytes, "little", signed=n == pickletools.TAKEN_FROM_ARGUMENT4)
                if length < 0:
                    return keys
                if length <= _KEY_BYTES:
                    data = stream.read(length)
                    read += length
                    if "UNICODE" in op.name:
                        value = data.decode("utf-8", "surrogatepass")
                else:
                    stream.seek(length, os.SEEK_CUR)  # a payload: not read
            else:
                data = stream.read(n)
                read += n
                if len(data) != n:
                    return keys
                try:
                    value = op.arg.reader(io.BytesIO(data))
                except ValueError:
                    return keys
        if op.name == "FRAME" or op.name == "PROTO":
            continue
        if op.name == "STOP":
            return keys
        if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            continue  # the stack is as it was
        if keys and first_global is None and op.name in ("GLOBAL", "INST", "STACK_GLOBAL"):
            # The result's embeddings are an array: the first name its value asks for is numpy's.
            module = value if op.name != "STACK_GLOBAL" else stack[-2] if len(stack) > 1 else None
            first_global = module.split(" ")[0] if isinstance(module, str) else ""
        # Pop what the opcode takes.
        before = op.stack_before
        if pickletools.markobject in before:
            while stack and stack[-1] is not _MARK:
                stack.pop()
            if not stack:
                return keys
            stack.pop()
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        if op.name == "DUP":
            below = 0
        if below > len(stack):
            return keys
        del stack[len(stack) - below:]
        for pushed in op.stack_after:
            if pushed is pickletools.markobject:
                stack.append(_MARK)
                continue
            if op.name in ("EMPTY_DICT", "DICT") and not stack:
                stack.append(top_dict)
                continue
            if stack and stack[0] is top_dict:
                rest = stack[1:]
                if not rest or (rest[0] is _MARK and len(rest) % 2 == 1):
                    # Where the dict's next key goes, once its last value is complete: the
                    # first key is the first push; a later one is told by its name.
                    is_string = isinstance(value, str) and ("UNICODE" in op.name or "STRING" in op.name)
                    if not keys and not is_string:
                        return keys
                    numpy_value = first_global is not None and first_global.partition(".")[0] == "numpy"
                    if is_string and (not keys or (value == wanted[len(keys)] and numpy_value)):
                        keys.append(value)
                        if len(keys) >= len(wanted) or keys[0] != wanted[0]:
                            return keys
            stack.append(value if isinstance(value, str) else None)
    return keys


def is_merged_result(path: Path) -> bool:
    """Whether the file at ``path`` is a merged result in the legacy form, told from its first bytes:
    a pickled dict whose first keys are the result's first two, ``embeddings`` then ``articles``,
    as this tool's writer and the legacy script's ``pickle.dump`` both write them. Raises ``OSError``
    if it cannot be read."""
    with open(path, "rb") as stream:
        return _first_keys(stream, LEGACY_KEYS[:2]) == list(LEGACY_KEYS[:2])
