"""Durable per-file download state, and where every downloaded byte lives.

Layout under the download directory (this module alone knows it)::

    <download-dir>/<cluster>/<file>                       complete, verified files
    <download-dir>/.async_embed_sync/<cluster>/<file>.part   bytes so far
    <download-dir>/.async_embed_sync/<cluster>/<file>.json   this module's state
    <download-dir>/.async_embed_sync/<cluster>.listing.json  what the cluster held at the last sync
    <download-dir>/.async_embed_sync/lock, owner           one run at a time (``transfer/lock.py``)

The state directory is hidden so that whatever reads ``<download-dir>/*/``
(the merge) never sees a partial file. A state file is replaced atomically
(write a temporary, fsync, rename): after a crash it is either the old state
or the new one, never a torn one. A state file that cannot be parsed is
treated as absent: the partial it describes is then not trusted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .errors import AFTER_SYNC, translating_local_errors
from .fileio import file_sha256, fsync_directory

STATE_DIR_NAME = ".async_embed_sync"
_FORMAT_VERSION = 1


@dataclass
class FileState:
    """What is known about one remote file's local copy.

    ``verified_offset`` bytes of the partial file are on disk (fsynced) and
    hash to ``prefix_sha256``; nothing past it is trusted. Never holds a
    secret: only sizes, times and digests.
    """

    remote_size: int
    remote_mtime: int
    complete: bool = False
    verified_offset: int = 0
    prefix_sha256: str = ""
    sha256: str = ""
    # How the finished file was checked: "sha256" against the remote's
    # sha256sum, or "size" where the remote has no shell.
    verified_by: str = ""
    # The finished local file's identity (see ``file_identity``) when
    # ``sha256`` was taken: while it holds, the file is the one hashed.
    local_identity: list[int] | None = None
    # When the file was verified and moved into place (seconds since the
    # epoch, this machine's clock): said when the cluster no longer has it.
    verified_at: float = 0.0
    # Complete, but its mtime was too close to the listing that saw it to
    # tell a rewrite in the same second from this version: the next sync
    # fetches it again rather than trust its size and mtime.
    recheck: bool = False
    # Part of the prefix was fetched while the file was still being written:
    # only the server's sha256 of the whole file can vouch for it.
    hash_needed: bool = False

    def matches(self, size: int, mtime: int) -> bool:
        return self.remote_size == size and self.remote_mtime == mtime


class Listed(Protocol):
    """A listed remote file, as the sync records its listing."""

    name: str
    size: int
    mtime: int


@dataclass(frozen=True)
class LocalCopy:
    """What the download directory holds of one remote file, against its size and mtime there."""

    state: FileState | None  # the journal's record of it, if any
    # Complete here, the size and mtime the ones recorded, the file in place
    # of that size: the sync skips it, the status counts it complete.
    up_to_date: bool
    # As up_to_date, but also when it is to be checked again (``FileState.recheck``):
    # the copy of the version listed, which the sync that fetched it need not fetch again.
    complete_as_listed: bool = False

    @property
    def kept(self) -> int:
        """Verified bytes of a partial (of whichever version): what an interrupted download keeps."""
        return self.state.verified_offset if self.state is not None and not self.state.complete else 0


class DownloadLayout:
    """Paths of one download directory. Names must already be checked safe."""

    def __init__(self, download_dir: str | os.PathLike):
        self.root = Path(download_dir)
        self.state_root = self.root / STATE_DIR_NAME

    def final_path(self, cluster: str, name: str) -> Path:
        return self.root / cluster / name

    def partial_path(self, cluster: str, name: str) -> Path:
        return self.state_root / cluster / f"{name}.part"

    def state_path(self, cluster: str, name: str) -> Path:
        return self.state_root / cluster / f"{name}.json"

    def replacement_state_path(self, cluster: str, name: str) -> Path:
        """The journal of a partial that is to replace a complete, verified copy: apart from
        that copy's record, which stays until the new version is in place."""
        return self.state_root / cluster / f"{name}.replacing"

    def load_replacement_state(self, cluster: str, name: str) -> FileState | None:
        return self._read_state(self.replacement_state_path(cluster, name))

    def save_replacement_state(self, cluster: str, name: str, state: FileState) -> None:
        self._write_state(self.replacement_state_path(cluster, name), state)

    def forget_replacement(self, cluster: str, name: str) -> None:
        """Drop a replacement's partial and journal; the complete copy and its record stay."""
        for path in (self.partial_path(cluster, name), self.replacement_state_path(cluster, name)):
            with translating_local_errors(path, "remove", AFTER_SYNC):
                path.unlink(missing_ok=True)

    def cluster_folders(self, cluster: str) -> tuple[Path, Path]:
        """Where ``cluster``'s complete files and its partials and state live."""
        return self.root / cluster, self.state_root / cluster

    def prepare(self, cluster: str) -> None:
        for folder in self.cluster_folders(cluster):
            with translating_local_errors(folder, "create the folder", AFTER_SYNC):
                folder.mkdir(parents=True, exist_ok=True)

    def local_copy(self, cluster: str, name: str, size: int, mtime: int) -> LocalCopy:
        """What is here of ``name``, which is ``size`` bytes with ``mtime`` on the cluster."""
        state = self.load_state(cluster, name)
        if state is None or not state.complete or not state.matches(size, mtime):
            return LocalCopy(state, up_to_date=False)
        try:
            in_place = self.final_path(cluster, name).stat().st_size == size
        except OSError:
            in_place = False
        in_place = in_place and self._still_as_verified(self.final_path(cluster, name), state)
        return LocalCopy(state, up_to_date=in_place and not state.recheck, complete_as_listed=in_place)

    @staticmethod
    def _still_as_verified(path: Path, state: FileState) -> bool:
        """The complete file at ``path`` is the one verified: its identity as recorded, or, after
        a change of identity (a byte changed here, a copy, a restore), bytes that still hash to
        the sha256 verified. A file changed here is then not up to date: the sync fetches it
        again, where it used to be skipped on its size alone. Hashed only when the identity
        changed; journals from before identities were recorded are taken as they are."""
        if state.local_identity is None or not state.sha256:
            return True
        try:
            return file_identity(path) == state.local_identity or file_sha256(path) == state.sha256
        except OSError:
            return False

    def is_up_to_date(self, cluster: str, name: str, size: int, mtime: int) -> bool:
        """Complete locally and unchanged remotely (size and mtime)."""
        return self.local_copy(cluster, name, size, mtime).up_to_date

    def check_readable(self, cluster: str, after: str) -> None:
        """Raise ``LocalFileError`` if a file sits where ``cluster``'s folders belong.

        Absent folders are fine (nothing downloaded yet); a file in their
        place would otherwise read as "nothing downloaded" too.
        """
        for folder in self.cluster_folders(cluster):
            with translating_local_errors(folder, "read the folder", after):
                try:
                    mode = os.stat(folder).st_mode
                except FileNotFoundError:
                    continue
                if not stat.S_ISDIR(mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))

    def load_state(self, cluster: str, name: str) -> FileState | None:
        return self._read_state(self.state_path(cluster, name))

    @staticmethod
    def _read_state(path: Path) -> FileState | None:
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.pop("version", None) != _FORMAT_VERSION:
                return None
            return FileState(**document)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # Damaged (torn by a disk error, edited by hand): recover by
            # forgetting it, which makes the partial untrusted, not by crashing.
            return None

    def save_state(self, cluster: str, name: str, state: FileState) -> None:
        self._write_state(self.state_path(cluster, name), state)

    @staticmethod
    def _write_state(path: Path, state: FileState) -> None:
        document = {"version": _FORMAT_VERSION, **asdict(state)}
        with translating_local_errors(path, "write", AFTER_SYNC):
            write_atomically(path, json.dumps(document, sort_keys=True).encode("utf-8"))

    def record_complete(self, cluster: str, name: str, state: FileState, sha256: str, verified_by: str) -> None:
        """Record that the file now in place at ``final_path(cluster, name)`` is complete and hashes to ``sha256``."""
        state.complete = True
        state.sha256 = sha256
        state.verified_by = verified_by
        state.local_identity = file_identity(self.final_path(cluster, name))
        state.verified_at = time.time()
        self.save_state(cluster, name, state)
        with translating_local_errors(self.replacement_state_path(cluster, name), "remove", AFTER_SYNC):
            self.replacement_state_path(cluster, name).unlink(missing_ok=True)

    def verified_sha256(self, path: Path) -> str | None:
        """The sha256 the sync recorded for the complete file at ``path``, if it is still that file.

        None unless ``path`` is ``<download-dir>/<cluster>/<name>``, its
        state is complete, and the file's identity (inode, size, change and
        modification times) is the one recorded when it was hashed: any write,
        rename or replacement since changes the change time, which no one
        can set back. Saves the merge from reading a synced file to hash it.
        """
        path = Path(path)
        if path.parent.parent != self.root:
            return None
        state = self.load_state(self.cluster_of(path), path.name)
        if state is None or not state.complete or not state.sha256 or state.local_identity is None:
            return None
        try:
            identity = file_identity(path)
        except OSError:
            return None
        return state.sha256 if identity == state.local_identity else None

    def complete_files(self) -> list[Path]:
        """Every file in place, ``<download-dir>/<cluster>/<name>``, sorted by path (symlinks followed).

        Hidden entries are skipped: the partials and the journal live under
        a dot-directory, so whatever reads the cluster folders (the merge)
        never sees a partial file.
        """
        folders = sorted(entry for entry in self.root.iterdir() if not entry.name.startswith(".") and entry.is_dir())
        return [folder / name for folder in folders for name in _visible_files(folder, follow_symlinks=True)]

    @staticmethod
    def cluster_of(path: Path) -> str:
        """The cluster whose folder holds ``path``, one of :meth:`complete_files`."""
        return Path(path).parent.name

    def state_files(self) -> list[Path]:
        """Every per-file state on disk (complete or not), for checks that none is torn."""
        return sorted(self.state_root.glob("*/*.json"))

    def listing_files(self) -> list[Path]:
        """Every cluster listing on disk."""
        return sorted(self.state_root.glob("*.listing.json"))

    @property
    def lock_path(self) -> Path:
        """The file ``transfer/lock.py`` holds an ``flock`` on while a run writes here."""
        return self.state_root / "lock"

    @property
    def lock_owner_path(self) -> Path:
        """Who holds the lock: host name and pid."""
        return self.state_root / "owner"

    def listing_path(self, cluster: str) -> Path:
        return self.state_root / f"{cluster}.listing.json"

    def save_listing(self, cluster: str, files: Iterable[str | Listed]) -> None:
        """Record what a complete listing of ``cluster`` found: what it holds now.

        ``files``: names, or listed files with their size and mtime, which the
        merge then checks every file here against (``not_as_listed``)."""
        files = list(files)
        document = {"version": _FORMAT_VERSION, "names": sorted(f if isinstance(f, str) else f.name for f in files),
                    "files": {f.name: [f.size, f.mtime] for f in files if not isinstance(f, str)}}
        with translating_local_errors(self.listing_path(cluster), "write", AFTER_SYNC):
            write_atomically(self.listing_path(cluster), json.dumps(document).encode("utf-8"))

    def load_listing(self, cluster: str) -> frozenset[str] | None:
        """The names ``cluster`` held at its last complete listing; None if never recorded (or unreadable)."""
        try:
            document = json.loads(self.listing_path(cluster).read_text(encoding="utf-8"))
            if document.get("version") != _FORMAT_VERSION:
                return None
            return frozenset(str(name) for name in document["names"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def listed_files(self, cluster: str) -> dict[str, tuple[int, int]] | None:
        """Name -> (size, mtime) as ``cluster``'s last complete listing saw them; None if not recorded."""
        try:
            document = json.loads(self.listing_path(cluster).read_text(encoding="utf-8"))
            if document.get("version") != _FORMAT_VERSION or "files" not in document:
                return None
            return {str(name): (int(size), int(mtime)) for name, (size, mtime) in document["files"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def not_as_listed(self, cluster: str) -> list[tuple[str, str]]:
        """The files ``cluster``'s last listing saw that are not here, complete, as it saw them,
        by name, each with why in a few words; none if no listing recorded sizes and mtimes.

        A sync puts a file in place only as the listing saw it, and lists
        again until nothing changed; this catches what came after: a sync
        stopped between its listings, a file completed by an older version."""
        return [(name, why) for name, (size, mtime) in sorted((self.listed_files(cluster) or {}).items())
                if (why := self._why_not_as_listed(cluster, name, size, mtime)) is not None]

    def _why_not_as_listed(self, cluster: str, name: str, size: int, mtime: int) -> str | None:
        state = self.load_state(cluster, name)
        # A replacement partial of a newer version, unless the listing names the verified copy
        # here (a new version refused as no readable checkpoint: the copy stands).
        replacing = self.load_replacement_state(cluster, name) is not None \
            and not (state is not None and state.matches(size, mtime))
        if (state is not None and not state.complete) or replacing:
            return "a newer version is partly fetched: still being written there, or the sync stopped"
        if not self.final_path(cluster, name).exists():
            return "not here: still being written there, or the sync stopped before it"
        if state is None:
            return "no sync recorded verifying it"
        if not state.matches(size, mtime):
            return "the cluster's last listing saw another version"
        return None

    def local_only(self, cluster: str, listed: Iterable[str]) -> list[str]:
        """Files in ``<download-dir>/<cluster>/`` that are not in ``listed``: the cluster no longer
        holds them (deleted, or its run re-split since an earlier sync). Sorted names."""
        listed = set(listed)
        return [name for name in _visible_files(self.root / cluster, follow_symlinks=False) if name not in listed]

    def forget(self, cluster: str, name: str) -> None:
        """Drop the partial and its state: the next attempt starts at 0."""
        for path in (self.partial_path(cluster, name), self.state_path(cluster, name)):
            with translating_local_errors(path, "remove", AFTER_SYNC):
                path.unlink(missing_ok=True)


def _visible_files(folder: Path, follow_symlinks: bool) -> list[str]:
    """Sorted names of the regular files in ``folder`` that are not hidden; none if it is absent."""
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(entry.name for entry in entries
                  if not entry.name.startswith(".") and entry.is_file(follow_symlinks=follow_symlinks))


def file_identity(path: Path) -> list[int]:
    """What changes whenever the file at ``path`` does: inode, size, change and modification times (ns)."""
    stat = os.stat(path)
    return [stat.st_ino, stat.st_size, stat.st_ctime_ns, stat.st_mtime_ns]


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves old or new."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        # A full disk (or a stop) leaves no temporary file behind.
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def free_space(directory: str | os.PathLike) -> tuple[int, str] | None:
    """The bytes this user may still write on the file system that holds ``directory``
    (or would hold it: its nearest existing parent), and that file system's mount point;
    None if it cannot be told."""
    current = Path(os.path.abspath(directory))
    while not current.exists() and current.parent != current:
        current = current.parent
    try:
        stats = os.statvfs(current)
        device = current.stat().st_dev
        mount = current
        while mount.parent != mount and mount.parent.stat().st_dev == device:
            mount = mount.parent
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize, str(mount)
