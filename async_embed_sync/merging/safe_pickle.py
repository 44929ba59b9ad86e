"""Unpickle untrusted bytes: nothing but numpy arrays, dtypes, scalars and plain containers is ever built.

Every global a pickle names is looked up in one allow-list; any other is
refused (:class:`UnsafePickleError`) before anything runs. Every failure
names the file (:class:`CheckpointError`). A large array payload may be
mapped from the file instead of read (:func:`restricted_load_mapped`).

What the allowed constructors make is bounded by the file's own size (twice
it), over the whole load (:class:`_Allocations`): ``bytearray(n)``, ``numpy.ndarray(shape)``
and ``_reconstruct``'s shape, a scalar's dtype, copies of containers, text made
bytes, the state numpy copies into an array. A 57-byte pickle asking for
``bytearray(2**31)`` is refused before anything is allocated, and so is one that
copies a list, or an array's bytes, that it holds once, again and again.
"""

from __future__ import annotations

import datetime
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import CheckpointError, UnsafePickleError

# Whatever can go wrong inside an unpickler fed hostile or torn bytes, short of
# our own refusals: a truncated stream, a bad opcode argument, a REDUCE whose
# allowed callable rejects its arguments, an absurd allocation.
_UNPICKLING_FAILURES = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    UnicodeDecodeError,
    MemoryError,
)


class _RefusedContent(pickle.UnpicklingError):
    """An allowed constructor was asked for something we do not accept."""


class _Allocations:
    """What the allowed constructors may allocate in one load: at most twice the file's own size
    in all (plus a little, for the empty and tiny values every pickle holds), charged before each call.

    Every value a pickle builds from its own opcodes costs at least a byte of the file; only a
    constructor can make more than it was given (``bytearray(n)``, an array of a shape, a copy
    of a list made again and again). Charged in bytes for arrays and byte strings, in items
    for the copies of containers (each item was at least a byte of the file once).
    """

    SLACK = 4096

    def __init__(self, file_size: int):
        self.file_size = file_size
        # Twice: a legacy protocol-2 array is text in the file, made bytes, then (byte-swapped,
        # misaligned or small) copied into its array: two allocations of the file's bytes at most.
        self.left = 2 * file_size + self.SLACK
        self.shells = 0  # arrays built, each in an _ArrayShell until the load ends

    def charge(self, amount: int, what: str) -> None:
        if amount > self.left:
            raise _RefusedContent(
                f"a request for {amount:,} {'items' if what.startswith('a copy') else 'bytes'} ({what}), more "
                f"than the file's own {self.file_size:,} bytes can account for")
        self.left -= amount


def _shape_bytes(shape: Any, dtype: Any) -> int:
    # What numpy would allocate for an array of ``shape`` in ``dtype``; numpy itself refuses odd arguments.
    sizes = (shape,) if isinstance(shape, int) else tuple(shape) if isinstance(shape, (tuple, list)) else ()
    if not all(isinstance(size, int) for size in sizes):
        return 0
    if any(size < 0 for size in sizes):
        raise _RefusedContent("an array of a negative size")
    return math.prod(sizes) * np.dtype(dtype).itemsize


def _container_length(argument: Any) -> int:
    if isinstance(argument, (str, bytes, bytearray, list, tuple, set, frozenset, dict)):
        return len(argument)
    raise _RefusedContent(f"a container built from {type(argument).__name__}")


class _ArrayShell:
    """An array the stream built, until the load ends: its ``__setstate__`` (the BUILD that
    numpy's pickles follow an array with) is charged before numpy runs it, for numpy copies the
    state's bytes (a byte-swapped or misaligned array, a small one, latin-1 text): one payload
    held once in the file, given to array after array, would otherwise be copied again and again.
    Each shell is replaced by its array once the load ends (:func:`_unwrap`)."""

    __slots__ = ("array", "allocations")

    def __init__(self, array: np.ndarray, allocations: _Allocations):
        self.array = array
        self.allocations = allocations
        allocations.shells += 1

    def __setstate__(self, state: Any) -> None:
        data = state[-1] if isinstance(state, tuple) and state else None
        if isinstance(data, (bytes, bytearray, str, list)):
            self.allocations.charge(len(data), "an array's state, copied")
        self.array.__setstate__(state)


def _bounded_globals(allocations: _Allocations) -> dict[tuple[str, str], Any]:
    """The allow-list's constructors for one load, each charging ``allocations`` before it allocates."""

    def new_array(shape: Any, dtype: Any = float, buffer: Any = None, *arguments: Any, **options: Any) -> _ArrayShell:
        if buffer is None and options.get("buffer") is None:
            allocations.charge(_shape_bytes(shape, dtype), "numpy.ndarray(shape)")
        return _ArrayShell(np.ndarray(shape, dtype, buffer, *arguments, **options), allocations)

    def reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> _ArrayShell:
        # numpy's own ``_reconstruct`` would build any ndarray subclass named in
        # the stream; only the base class is accepted.
        if subtype is not np.ndarray and subtype is not new_array:
            raise _RefusedContent(f"an array of type {subtype!r}")
        allocations.charge(_shape_bytes(shape, dtype_code), "numpy _reconstruct(shape)")
        return _ArrayShell(np.ndarray.__new__(np.ndarray, shape, dtype_code), allocations)

    def frombuffer(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> _ArrayShell:
        # A view of a buffer the stream holds: nothing allocated (a BUILD on it would be charged).
        return _ArrayShell(_frombuffer(buffer, dtype, shape, order), allocations)

    def scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
        # Only an object scalar's second argument is not its bytes.
        if np.dtype(dtype).hasobject or not isinstance(data, bytes):
            raise _RefusedContent("an object scalar")
        if np.dtype(dtype).itemsize > len(data):
            raise _RefusedContent(f"a numpy scalar of {np.dtype(dtype).itemsize:,} bytes made of {len(data):,}")
        return _numpy_scalar(dtype, data)

    def latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
        # Protocol 2 carries bytes as latin-1 text plus a call to _codecs.encode.
        if encoding.lower().replace("-", "") != "latin1":
            raise _RefusedContent(f"bytes in encoding {encoding!r}")
        allocations.charge(len(text), "bytes made of text")
        return text.encode("latin-1")

    def new_bytearray(*arguments: Any) -> bytearray:
        if arguments and isinstance(arguments[0], int):
            allocations.charge(arguments[0], "bytearray(n)")
        elif arguments:
            allocations.charge(_container_length(arguments[0]), "bytearray(...)")
        return bytearray(*arguments)

    def copying(container: type) -> Callable[..., Any]:
        def build(*arguments: Any) -> Any:
            if arguments:
                allocations.charge(_container_length(arguments[0]), f"a copy made by {container.__name__}()")
            return container(*arguments)
        return build

    containers = {"list": copying(list), "dict": copying(dict), "set": copying(set),
                  "frozenset": copying(frozenset), "bytearray": new_bytearray}
    return {
        **_numpy_names("_reconstruct", reconstruct, "numpy._core.multiarray", "numpy.core.multiarray"),
        **_numpy_names("scalar", scalar, "numpy._core.multiarray", "numpy.core.multiarray"),
        **_numpy_names("_frombuffer", frombuffer, "numpy._core.numeric", "numpy.core.numeric"),
        ("numpy", "ndarray"): new_array,
        ("_codecs", "encode"): latin1_encode,
        **{(module, name): value for module in ("builtins", "__builtin__") for name, value in containers.items()},
    }


def _frombuffer(buffer: Any, dtype: np.dtype, shape: tuple[int, ...], order: str) -> np.ndarray:
    # A view of a buffer the stream holds: nothing allocated.
    if np.dtype(dtype).hasobject:
        raise _RefusedContent("an object array")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# numpy's own scalar constructor, whichever module this numpy keeps it in.
_numpy_scalar = np.int64(0).__reduce__()[0]


def _empty_bytes(*arguments: Any) -> bytes:
    # Protocol 2 writes b"" as a call to bytes() without arguments; bytes(n) would allocate n bytes.
    if arguments:
        raise _RefusedContent("bytes built from arguments")
    return b""


def _numpy_names(name: str, value: Callable[..., Any], *modules: str) -> dict[tuple[str, str], Any]:
    return {(module, name): value for module in modules}


# numpy 2 pickles name ``numpy._core``; numpy 1.x pickles name ``numpy.core``.
# Protocol 2 pickles written by Python 3 name builtins ``__builtin__``. Those
# that allocate are replaced, per load, by :func:`_bounded_globals`' (None here).
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    **_numpy_names("_reconstruct", None, "numpy._core.multiarray", "numpy.core.multiarray"),
    **_numpy_names("scalar", None, "numpy._core.multiarray", "numpy.core.multiarray"),
    **_numpy_names("_frombuffer", None, "numpy._core.numeric", "numpy.core.numeric"),
    ("numpy", "ndarray"): None,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): None,
    **{(module, "bytes"): _empty_bytes for module in ("builtins", "__builtin__")},
    ("datetime", "datetime"): datetime.datetime,
    **{
        (module, container.__name__): None
        for module in ("builtins", "__builtin__")
        for container in (list, dict, set, frozenset, bytearray)
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and plain containers; refuses every other global."""

    def __init__(self, stream: BinaryIO, source: Path):
        super().__init__(stream)
        self.source = source
        self.allocations = _Allocations(os.stat(source).st_size)
        self._bounded = _bounded_globals(self.allocations)

    def find_class(self, module: str, name: str) -> Any:
        try:
            value = _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(str(self.source), f"{module}.{name}") from None
        return self._bounded[(module, name)] if value is None else value


def _unwrap(document: Any, shells: int) -> Any:
    """``document`` with every :class:`_ArrayShell` in it (``shells`` of them were made)
    replaced by its array.

    The top-level values of a dict (a checkpoint's embeddings) first: most documents hold
    no other array, and are not walked. Otherwise lists, dicts and arrays of objects are
    changed in place, tuples rebuilt; a shell as a set member or dict key is refused (no
    array can be one)."""
    if shells == 0:
        return document
    if type(document) is _ArrayShell:
        return document.array if shells == 1 else _unwrap_all(document)
    if type(document) is dict:
        found = 0
        for key, value in document.items():
            if type(value) is _ArrayShell:
                document[key] = value.array
                found += 1
        if found == shells:
            return document
    return _unwrap_all(document)


def _unwrap_all(document: Any) -> Any:
    seen: set[int] = set()

    def walk(value: Any) -> Any:
        kind = type(value)
        if kind is _ArrayShell:
            value, kind = value.array, np.ndarray
        if kind in (list, dict, tuple, set, frozenset, np.ndarray):
            if id(value) in seen:
                return value
            seen.add(id(value))
        if kind is np.ndarray:
            # An array of objects holds its items as they were pickled: arrays among them.
            if value.dtype.hasobject:
                for index in np.ndindex(value.shape):
                    if type(value[index]) in _WALKED:
                        value[index] = walk(value[index])
        elif kind is list:
            for index, item in enumerate(value):
                if type(item) in _WALKED:
                    value[index] = walk(item)
        elif kind is dict:
            for key, item in value.items():
                if type(key) is _ArrayShell:
                    raise _RefusedContent("an array as a dict key")
                if type(item) in _WALKED:
                    value[key] = walk(item)
        elif kind is tuple:
            items = tuple(walk(item) if type(item) in _WALKED else item for item in value)
            if any(new is not old for new, old in zip(items, value)):
                return items
        elif kind in (set, frozenset) and any(type(item) is _ArrayShell for item in value):
            raise _RefusedContent("an array in a set")
        return value

    try:
        return walk(document)
    except RecursionError:
        raise _RefusedContent("containers nested too deeply to be read") from None


_WALKED = (_ArrayShell, list, dict, tuple, set, frozenset, np.ndarray)


def restricted_load(
    path: Path, unpickler: Callable[[BinaryIO, Path], RestrictedUnpickler] = RestrictedUnpickler
) -> Any:
    """Unpickle ``path`` safely; :class:`CheckpointError` names the file on any failure.

    ``unpickler`` builds the unpickler from the open file and its path: a
    subclass of :class:`RestrictedUnpickler` may change how allowed objects
    are rebuilt, never what is allowed.
    """
    try:
        with open(path, "rb") as stream:
            loading = unpickler(stream, path)
            return _unwrap(loading.load(), loading.allocations.shells)
    except UnsafePickleError:
        raise
    except _RefusedContent as exc:
        raise CheckpointError(str(path), f"the pickle holds {exc}, which is refused.") from exc
    except _UNPICKLING_FAILURES as exc:
        raise CheckpointError(
            str(path), f"not a readable pickle (truncated or corrupt: {exc!r})."
        ) from exc
    except OSError as exc:
        raise CheckpointError.unreadable(exc, path) from exc


# A payload (the bytes of an array) at least this large is mapped from the file, not read.
MAPPED_PAYLOAD_BYTES = 1 << 20


@dataclass(frozen=True)
class _SkippedPayload:
    address: int  # where in memory the unpickler wanted the bytes
    length: int
    offset: int  # where they are in the file


class _PayloadSkippingReader:
    """A file for the unpickler that leaves large ``readinto`` requests unfilled, noting where they were.

    The unpickler reads a large bytes or bytearray payload (an array's data)
    with one ``readinto`` into a fresh buffer: left unfilled, the buffer's
    pages are never touched, and cost neither memory nor a copy.
    """

    def __init__(self, stream: BinaryIO, threshold: int):
        self._stream = stream
        self._threshold = threshold
        self.read = stream.read
        self.readline = stream.readline
        self.peek = getattr(stream, "peek", None) or (lambda size=0: b"")
        self.skipped: list[_SkippedPayload] = []

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if view.nbytes < self._threshold:
            return self._stream.readinto(buffer)
        position = self._stream.tell()
        end = self._stream.seek(0, os.SEEK_END)
        self._stream.seek(min(position + view.nbytes, end))
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        self.skipped.append(_SkippedPayload(address, view.nbytes, position))
        return min(view.nbytes, end - position)


def _mapped(array: np.ndarray, payload: _SkippedPayload, path: Path, mode: str) -> np.ndarray | None:
    """``array`` mapped from ``path`` if ``payload`` holds the end of its bytes, else None.

    The unpickler may have buffered the first bytes of the payload already
    (they were copied into the array): they precede the skipped ones in the file.
    """
    buffered = payload.address - array.ctypes.data
    if not array.flags.c_contiguous or buffered < 0 or buffered + payload.length != array.nbytes:
        return None
    data = np.memmap(path, dtype=np.uint8, mode=mode, offset=payload.offset - buffered, shape=(array.nbytes,))
    return np.frombuffer(data, dtype=array.dtype).reshape(array.shape)


def restricted_load_mapped(path: Path, mode: str = "r", threshold: int = MAPPED_PAYLOAD_BYTES) -> Any:
    """:func:`restricted_load` of a dict whose large ``embeddings`` array is mapped from the file, not read.

    Reading an array's bytes costs a copy into fresh memory (most of the
    time of loading a checkpoint); a map costs neither. ``mode`` is that of
    :class:`numpy.memmap` ("r": read-only, "c": copy-on-write). A payload of
    ``threshold`` bytes or more is left unread; if one is not the
    embeddings', its bytes are missing, and the file is read again, whole.
    """
    readers: list[_PayloadSkippingReader] = []

    def unpickler(stream: BinaryIO, source: Path) -> RestrictedUnpickler:
        readers.append(_PayloadSkippingReader(stream, threshold))
        return RestrictedUnpickler(readers[-1], source)  # type: ignore[arg-type]

    document = restricted_load(path, unpickler)
    skipped = readers[0].skipped
    if not skipped:
        return document
    embeddings = document.get("embeddings") if isinstance(document, dict) else None
    try:
        mapped = (
            _mapped(embeddings, skipped[0], path, mode)
            if len(skipped) == 1 and isinstance(embeddings, np.ndarray)
            else None
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(str(path), f"cannot be memory-mapped ({exc}).") from exc
    if mapped is None:
        return restricted_load(path)
    document["embeddings"] = mapped
    return document
