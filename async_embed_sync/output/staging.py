"""The staging area beside the output, and the atomic publish of what was written there.

Nothing appears at the output path until :func:`publish` renames the staged
result into place; the staging area is removed on any exception, Ctrl-C
included. What a killed merge left beside its output is dealt with by the
next merge that sees it (:func:`remove_stale_staging`): its staging area is
removed once its process is gone, whatever output it was for, and a previous
result it had moved aside is put back where it was, never deleted while
nothing stands at its path.

A bundle replaces the previous one with one ``renameat2(RENAME_EXCHANGE)``
where the kernel and file system have it: at every instant one complete
result is at the output path. Elsewhere the previous result is moved aside
first (``.NAME.HOST.PID.previous``), and the next merge puts it back if a
kill came between the two renames.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ..errors import AFTER_MERGE, LocalFileError, translating_local_errors
from ..layout import free_space
from ..processes import process_is_gone
from ..progress import format_bytes
from .forms import PICKLE_SUFFIXES
from .spec import OutputSpec

logger = logging.getLogger(__name__)

_STAGING_SUFFIX = ".merging"
_PREVIOUS_SUFFIX = ".previous"

# A seam for the tests of a publish cut short: called with the step just done
# ("exchanged": the new bundle is in place, the old one in the staging area;
# "moved aside": the old one is at its .previous name, nothing at the output).
on_publish_step: Callable[[str], None] | None = None
# Whether to try renameat2(RENAME_EXCHANGE): a test turns it off to take the fallback.
use_exchange = True


def _owner_tag() -> str:
    # Which process owns a staging entry: a later merge removes it once that
    # process is gone. Dots in the host name are kept: the pid is parsed from the right.
    return f"{socket.gethostname()}.{os.getpid()}"


def _owner_is_gone(tag: str) -> bool:
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or not ours to judge
    return process_is_gone(int(pid))


def _own_entry(name: str, output: str) -> tuple[str, str, str] | None:
    """``(output name, owner tag, kind)`` of a name this tool gives its staging areas and
    moved-aside results on this host: ``.NAME.HOST.PID.RANDOM.merging`` (RANDOM eight
    characters, as every version made it; any for ``output``'s own, as earlier merges read
    them) and ``.NAME.HOST.PID.previous``; None for any other name. The host is known
    (ours), which cuts the dotted name apart."""
    host = re.escape(socket.gethostname())
    found = re.fullmatch(rf"\.(?P<output>.+)\.(?P<tag>{host}\.\d+)(?:\.(?P<random>[^.]+)(?P<merging>\.merging)|\.previous)",
                         name)
    if found is None:
        return None
    if found["merging"] and found["output"] != output and not re.fullmatch(r"[a-z0-9_]{8}", found["random"]):
        return None
    return found["output"], found["tag"], "merging" if found["merging"] else "previous"


def _put_back(previous: Path, output: Path) -> bool:
    """Rename ``previous`` back to ``output`` if nothing is there (no rename over anything); whether it was."""
    if output.exists() or output.is_symlink():
        return False
    try:
        os.rename(previous, output)  # nothing at output: a folder lands there, or this fails
    except OSError:
        return False
    logger.warning(
        "Put back %s: a merge to it was killed while it published, after it had moved the previous result "
        "aside to %s; that result is at %s again.", output, previous.name, output)
    return True


def remove_stale_staging(output: Path) -> list[Path]:
    """Deal with what killed merges left beside ``output``, in its folder; return what was removed.

    Only names this tool makes (:func:`_own_entry`), on this host, whose
    process is gone, are touched: a previous result moved aside goes back to
    its path if nothing is there (said on the log), or is removed once a
    result stands there; a staging area is removed, whichever output it was for.
    Others' (another machine's, or a merge still running) are left; see :func:`foreign_staging`.
    """
    removed = []
    try:
        names = sorted(os.listdir(output.parent))
    except OSError:
        return removed
    # Moved-aside results first: one put back makes its .previous siblings removable.
    for name in sorted(names, key=lambda name: not name.endswith(_PREVIOUS_SUFFIX)):
        entry = _own_entry(name, output.name)
        if entry is None or not _owner_is_gone(entry[1]):
            continue
        path = output.parent / name
        if not path.is_dir() or path.is_symlink():
            continue
        # Only a bundle is ever moved aside: a .previous of a pickle's name is no result.
        if entry[2] == "previous" and Path(entry[0]).suffix.lower() not in PICKLE_SUFFIXES:
            target = output.parent / entry[0]
            if _put_back(path, target):
                continue
            if not (target.exists() or target.is_symlink()):
                continue  # could not be put back: kept, never deleted
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def foreign_staging(output: Path) -> list[Path]:
    """Staging areas and moved-aside results beside ``output`` that another machine's merge
    made (the name says so): never removed here, only named."""
    found = []
    try:
        names = sorted(os.listdir(output.parent))
    except OSError:
        return found
    for name in names:
        # ".NAME.HOST" then the pid: ours if it ends with this host's name.
        match = re.fullmatch(r"\.(?P<stem>.+\..+)\.\d+(?:\.[0-9a-f]{8}\.merging|\.previous)", name)
        if match is not None and not match["stem"].endswith(f".{socket.gethostname()}"):
            found.append(output.parent / name)
    return found


def check_room(staging: StagingArea, needed: int,
               free: Callable[[Path], tuple[int, str] | None] | None = None) -> None:
    """Refuse, before the output is written, a result of about ``needed`` bytes that its file
    system has no room for: a ``LocalFileError`` in one line (``needs 1.9 GiB, 400 MiB free on
    /mnt/x``). ``free``: how free space is told (``layout.free_space``, a seam for tests)."""
    room = (free or free_space)(staging.path)
    if room is None:
        return  # cannot be told: the writes say it if it does not fit
    available, mount = room
    if needed > available:
        raise LocalFileError(
            str(staging.output),
            f"not enough disk space: needs {format_bytes(needed)}, {format_bytes(available)} free on {mount} "
            f"(the merged result, estimated from its rows, dimension, dtype and articles). Nothing was written at "
            f"the output path: free some space and run the merge again, or choose an --output on another "
            f"file system.")


def _make_staging_directory(output: Path) -> Path:
    """A new hidden directory beside ``output``, named as :func:`remove_stale_staging` expects.

    Not ``tempfile.mkdtemp``: its 0700 would become the published bundle's
    mode, whatever the umask; ``mkdir(0o777)`` lets the umask decide, as
    for any directory the user makes (a group-readable bundle on a shared
    file system under umask 002).
    """
    while True:
        path = output.parent / f".{output.name}.{_owner_tag()}.{secrets.token_hex(4)}{_STAGING_SUFFIX}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue


class StagingArea:
    """A hidden directory beside the output of ``spec``, removed on leaving unless it was published."""

    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.output = spec.path
        self.path = self.output  # replaced on entry
        self._made_folders: list[Path] = []  # the output's missing parents, made here, innermost first
        self.foreign: list[Path] = []  # other machines' staging beside the output: named, never removed

    def __enter__(self) -> StagingArea:
        with translating_local_errors(self.output, "write", AFTER_MERGE):
            # Before anything else: a previous result a killed publish moved aside goes back first.
            remove_stale_staging(self.output)
        self.spec.check_path()
        with translating_local_errors(self.output, "write", AFTER_MERGE):
            parent = self.output.parent
            self._made_folders = [folder for folder in (parent, *parent.parents) if not folder.exists()]
            self.output.parent.mkdir(parents=True, exist_ok=True)
            self.foreign = foreign_staging(self.output)
            self.path = _make_staging_directory(self.output)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # After a publish of a bundle the directory has moved away: nothing left.
        shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None:
            # A merge that failed leaves no trace, not even the folders it
            # made for its output; rmdir removes a folder only while empty.
            for folder in self._made_folders:
                try:
                    folder.rmdir()
                except OSError:
                    break


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(source: Path, target: Path) -> bool:
    """Swap ``source`` and ``target`` in one step (``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, the C library or the file system has no such call (nothing was done then)."""
    if not use_exchange:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(target))


def _step(name: str) -> None:
    if on_publish_step is not None:
        on_publish_step(name)


def _replace_directory(source: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(source, target)
        return
    if _exchange(source, target):
        # The new result is at target, the previous one at source, which the staging area removes.
        _step("exchanged")
        shutil.rmtree(source, ignore_errors=True)
        return
    previous = target.with_name(f".{target.name}.{_owner_tag()}{_PREVIOUS_SUFFIX}")
    os.replace(target, previous)
    _step("moved aside")
    try:
        os.replace(source, target)
    except BaseException:
        _put_back(previous, target)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def publish(staging: StagingArea) -> None:
    """Rename the finished result in ``staging`` into place, atomically."""
    output = staging.output
    staging.spec.check_path()  # the path may have changed while the merge ran
    with translating_local_errors(output, "write", AFTER_MERGE):
        if staging.spec.is_pickle:
            os.replace(staging.path / output.name, output)
        else:
            _replace_directory(staging.path, output)
