"""Every error the tool raises on purpose, in one tree.

Each class builds its own one-paragraph message from the fields it is given,
so that the CLI can print ``str(exc)`` and nothing else: no traceback, no
secret (no class here takes a password or key material as a field).

::

    AsyncEmbedSyncError                  anything the CLI turns into exit code 1
    ├── ConfigError                      credentials file / cluster settings
    │   ├── NoConfigError                no configuration where it was looked for
    │   ├── UnknownClusterError          --clusters names a cluster not configured
    │   └── KeyPermissionError           private key readable by group/others
    ├── ClustersLeftOutError             run --clusters would merge fewer clusters than configured
    ├── DownloadDirLockedError           another run holds the download directory
    ├── LocalFileError                   a local path cannot be used: in the way, denied,
    │   │                                read-only, disk full, name too long...
    │   │                                (built from the OSError by ``local_file_error``)
    │   └── NotEnoughSpaceError          a cluster's files would not fit: refused before fetching
    ├── RemoteError                      one cluster; carries ``cluster``
    │   ├── ConnectError                 host unreachable, refused, timed out
    │   │   └── HandshakeDroppedError    reached, then dropped before the login ended
    │   ├── AuthenticationError          server refused every credential
    │   ├── HostKeyError                 host key unknown or changed
    │   ├── RemoteDirectoryError         remote_dir missing or unreadable
    │   ├── NoCheckpointsError           remote_dir holds no matching files
    │   ├── UnsafeRemoteNameError        a listed name is not a plain file name
    │   ├── RemoteFileDeniedError        the account may not read a listed file
    │   ├── RemoteFileGoneError          a listed file was deleted before it was read
    │   ├── TransferError                link dropped or the server failed a read
    │   │   └── ConnectionDroppedError   the connection under a transfer went away
    │   ├── LinkLostError                reached in this run, then dropped and every reconnect failed
    │   ├── StillBeingWrittenError       a file changed mid-copy, or was written too recently
    │   └── NotACheckpointError          a changed file's new version is no readable checkpoint: old copy kept
    ├── VerificationError                downloaded bytes do not match the remote
    ├── SyncFailedError                  summary: some clusters did not sync
    ├── FollowGaveUpError                --follow waited --max-wait and the set is not complete
    ├── CheckpointError                  one checkpoint file is unreadable or unsafe
    │   └── UnsafePickleError            pickle asks for a global we do not allow
    ├── MergeValidationError             shards disagree: gap, overlap, dim, model
    │   └── RowsMissingError             the checkpoints stop short of the run's declared rows
    └── OutputError                      the output path is refused, or a result is unreadable

``TransferError`` is the retryable one: the sync scheduler reconnects and
resumes on it; everything else is final within a run. A file
``StillBeingWrittenError`` names is resumed by the next run (or poll).

``Terminated`` stands outside the tree: SIGTERM's stop, a ``BaseException``
as ``KeyboardInterrupt`` is (see ``termination.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

from .known_hosts import host_pattern


class AsyncEmbedSyncError(Exception):
    """Base class: ``str(exc)`` is a complete message for the user.

    ``cause`` is the same in a few plain words, and ``rerun_fixes`` whether
    running the same command again can get past it (a drop, a stall, a
    server that went away) or something must change first; the closing
    line of a failed sync says both.
    """

    cause = "an error"
    rerun_fixes = False


# --------------------------------------------------------------------- config


class ConfigError(AsyncEmbedSyncError):
    cause = "the configuration is wrong"

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"Configuration error in {source}: {problem}")


class NoConfigError(ConfigError):
    """No configuration in any of the places looked at; ``problem`` says where, and how to make one."""

    def __init__(self, problem: str):
        self.source = ""
        self.problem = problem
        AsyncEmbedSyncError.__init__(self, f"No configuration found. {problem}")


class UnknownClusterError(ConfigError):
    def __init__(self, source: str, unknown: Iterable[str], known: Iterable[str]):
        self.unknown = sorted(unknown)
        self.known = sorted(known)
        names = ", ".join(self.unknown)
        choices = ", ".join(self.known) or "(none)"
        super().__init__(
            source,
            f"unknown cluster(s) {names}; the configured clusters are: {choices}.",
        )


class KeyPermissionError(ConfigError):
    def __init__(self, source: str, cluster: str, key_file: str, mode: int):
        self.cluster = cluster
        self.key_file = key_file
        self.mode = mode
        super().__init__(
            source,
            f"cluster {cluster!r}: the private key {key_file} is readable by "
            f"group or others (mode {mode:04o}); ssh refuses such keys and so "
            f"does this tool. Fix it with: chmod 600 {key_file}",
        )


class DownloadDirLockedError(AsyncEmbedSyncError):
    def __init__(self, directory: str, holder: str, hint: str = ""):
        self.directory = directory
        self.holder = holder
        super().__init__(
            f"The download directory {directory} is in use by another run "
            f"({holder}). Wait for it to finish, or stop it: one run at a time "
            f"uses a download directory (two would write the same partial files, "
            f"or merge files still being written). {hint}".strip()
        )


class LocalFileError(AsyncEmbedSyncError):
    """A local file or folder cannot be used; ``problem`` is the cause and what to do.

    Built from the ``OSError`` by :func:`local_file_error` (or, at a seam,
    :func:`translating_local_errors`), so that every local failure reads the
    same way whichever module met it.
    """

    cause = "a local file or folder cannot be used"

    def __init__(self, path: str, problem: str, action: str = "write"):
        self.path = path
        self.problem = problem
        self.action = action
        super().__init__(f"Cannot {action} {path}: {problem}")


class NotEnoughSpaceError(LocalFileError):
    """A cluster's files still to fetch do not fit in the download directory's free space
    (what other clusters of the run reserved counted): refused before any of them is fetched.
    ``needed``, ``free``: formatted sizes; ``mount``: the file system's mount point."""

    rerun_fixes = False

    def __init__(self, cluster: str, needed: str, free: str, mount: str, directory: str):
        self.cluster = cluster
        self.cause = f"needs {needed}, {free} free on {mount}"
        AsyncEmbedSyncError.__init__(
            self, f"Cluster {cluster!r}: not enough disk space: needs {needed}, {free} free on {mount} (the files "
                  f"still to fetch into {directory}, beside what the other clusters of this run need). Nothing of "
                  f"it was fetched: free some space, or choose a --download-dir on another file system.")
        self.path, self.problem, self.action = directory, self.cause, "write"


# What the user can still count on after a failure, per phase: said at the
# end of the paragraph, after the fix.
AFTER_SYNC = "What was already verified is kept: once this is fixed, run the same command again to resume."
AFTER_MERGE = "Nothing was left at the output path: run the merge again once this is fixed."
NOTHING_CHANGED = "Nothing was changed."

_FULL = "free some space (or raise the quota or size limit, see ulimit -f) or choose a path on another file system"
_FIXES = {
    errno.EACCES: "this user lacks the permission; fix it (see ls -ld) or choose another path",
    errno.EPERM: "fix the permissions or choose another path",
    errno.EROFS: "the file system is mounted read-only; choose a path on a writable one",
    errno.ENOSPC: _FULL,
    errno.EDQUOT: _FULL,
    errno.EFBIG: _FULL,
    errno.ENAMETOOLONG: "a name in it is longer than the file system allows; choose a shorter path",
    errno.ELOOP: "a symbolic link is in the way, and links are not followed so that nothing is written "
                 "outside where it belongs; remove it",
    errno.EISDIR: "a folder is in the way where a file belongs; move it away or choose another path",
}


def some_names(names: Sequence[str], separator: str = ", ", last: str = " and ", most: int = 5) -> str:
    """The first ``most`` of ``names``, and how many more: "a.pkl, b.pkl and 3 more"."""
    shown = separator.join(names[:most])
    return shown + (f"{last}{len(names) - most} more" if len(names) > most else "")


def _file_in_the_way(path: str) -> str | None:
    """The nearest of ``path`` and its parents that exists and is not a folder."""
    current = os.path.abspath(path)
    while True:
        try:
            mode = os.lstat(current).st_mode
        except (FileNotFoundError, NotADirectoryError):
            mode = None
        except OSError:
            return None
        if mode is not None:
            return None if stat.S_ISDIR(mode) else current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def os_error_problem(exc: OSError, path: str | os.PathLike) -> str:
    """What went wrong at ``path``, in plain words, and the fix: "Read-only file system; choose ..."."""
    reason = exc.strerror or str(exc)
    fix = _FIXES.get(exc.errno or 0, "")
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        # mkdir says "File exists" and open "Not a directory" when a plain
        # file sits where a folder must be: name that file, it is the fix.
        blocker = _file_in_the_way(os.fspath(path))
        if blocker is not None:
            which = "it" if blocker == os.path.abspath(path) else blocker
            reason, fix = f"{which} is a file where a folder is needed", "move it away or choose another path"
    return f"{reason}; {fix}." if fix else f"{reason}."


def local_file_error(exc: OSError, path: str | os.PathLike, action: str = "write",
                     after: str = "") -> LocalFileError:
    """The one translation of a local ``OSError``: the path, the cause in plain words, the fix.

    ``action`` is what was being done to ``path`` ("write", "create the
    folder"...); ``after`` says what still holds (see ``AFTER_SYNC``).
    """
    return LocalFileError(os.fspath(path), f"{os_error_problem(exc, path)} {after}".strip(), action)


@contextlib.contextmanager
def translating_local_errors(path: str | os.PathLike, action: str = "write",
                             after: str = "") -> Iterator[None]:
    """At a local-I/O seam: an ``OSError`` inside becomes :func:`local_file_error`'s ``LocalFileError``."""
    try:
        yield
    except OSError as exc:
        raise local_file_error(exc, path, action, after) from exc


# --------------------------------------------------------------------- remote


class RemoteError(AsyncEmbedSyncError):
    """An error that belongs to one cluster."""

    retryable = False

    def __init__(self, cluster: str, detail: str):
        self.cluster = cluster
        self.detail = detail
        super().__init__(f"Cluster {cluster!r}: {detail}")


class ConnectError(RemoteError):
    """``transient``: refused, unreachable, timed out, which may pass; a host name
    that does not resolve will not."""

    def __init__(self, cluster: str, host: str, port: int, reason: str, *, transient: bool = True):
        self.host = host
        self.port = port
        self.reason = reason
        self.rerun_fixes = transient
        self.cause = f"{host}:{port} cannot be reached" if transient else f"the host name {host} is not found"
        # Refused or unreachable: a server that is down, or a wrong port; a rerun helps only the first.
        self.rerun_advice = "check host and port; a rerun resumes once it answers" if transient else None
        super().__init__(
            cluster,
            f"cannot connect to {host}:{port} ({reason}). Check the host name "
            f"and port in the configuration, and that the machine is reachable "
            f"(for example with: ssh -p {port} {host}).",
        )


class HandshakeDroppedError(ConnectError):
    """The host answered (TCP connected), then the connection dropped before the login
    ended: a drop, not an unreachable host. Retried with the reconnect backoff."""

    retryable = True

    def __init__(self, cluster: str, host: str, port: int, reason: str):
        self.host = host
        self.port = port
        self.reason = reason
        self.rerun_fixes = True
        self.cause = f"the connection to {host}:{port} dropped during the SSH handshake"
        self.rerun_advice = None
        RemoteError.__init__(
            self, cluster,
            f"the connection to {host}:{port} dropped during the SSH handshake ({reason}). The host "
            f"answered, so its name and port are right: the link or the server cut the connection "
            f"(a busy server's MaxStartups, an unsteady network). Run the same command again; on an "
            f"unsteady link, raise --retries.",
        )


class KeyProblem(NamedTuple):
    """Why a configured key was not offered to the server, and what fixes it."""

    path: str
    why: str
    fix: str


class AuthenticationError(RemoteError):
    """The server refused the login: says as whom, what was tried, what the server accepts.

    Where the configured keys could not even be offered (an encrypted key
    without its passphrase), that is the cause, and it is said first.
    """

    cause = "the server refused the login"

    def __init__(self, cluster: str, username: str, host: str, port: int, *,
                 tried: Iterable[str] = (), accepted: Iterable[str] = (), unanswered: str | None = None,
                 key_files: Iterable[str] = (), key_problems: Iterable[KeyProblem] = (),
                 unsent_password: bool = False, cut_off: bool = False, known_hosts: str | None = None):
        self.username = username
        self.host = host
        self.tried = list(tried)
        self.accepted = list(accepted)
        self.key_problems = list(key_problems)
        key_files = list(key_files)
        what = f" Tried: {'; '.join(self.tried)}." if self.tried else ""
        accepts = f" The server accepts: {', '.join(self.accepted)}." if self.accepted else ""
        refused = f"the server {host} refused the login as {username!r}."
        unusable = {problem.path for problem in self.key_problems}
        if self.key_problems and not unanswered and not [key for key in key_files if key not in unusable]:
            self.cause = "its key cannot be used" if len(self.key_problems) == 1 else "its keys cannot be used"
            keys = " ".join(f"the key {problem.path} cannot be used: {problem.why}; {problem.fix}."
                            for problem in self.key_problems)
            super().__init__(cluster, f"{keys} With nothing else to offer, {refused}{what}{accepts}")
            return
        if cut_off:
            fix = ("The server cut the login off after too many attempts (its MaxAuthTries): ssh-agent "
                   "offered its keys first. Set `key_file` for this cluster (then the agent offers only "
                   "that key), or add `IdentitiesOnly yes` for this host in your ssh config.")
        elif unanswered:
            fix = (f"The server asked for {unanswered}, and there is no terminal to ask: set it in "
                   f"the configuration, use a key, or run the command in a terminal.")
        elif unsent_password and not key_files:
            fix = ("The server takes no password here: set `key_file` for this cluster to a key it "
                   "accepts, or load that key into ssh-agent.")
        else:
            keys = "".join(f"-i {key} " for key in key_files)
            # The configured known_hosts, or ssh checks ~/.ssh/known_hosts and fails on the host key.
            keys += f"-o UserKnownHostsFile={known_hosts} " if known_hosts else ""
            fields = "`key_file`" if key_files else "`key_file` (or `password`)"
            agent = "" if key_files else "; or load a key into ssh-agent"
            fix = (f"Check `username` and {fields} for this cluster; "
                   f"`ssh -p {port} {keys}{username}@{host}` should log in{agent}.")
        super().__init__(cluster, f"{refused}{what}{accepts} {fix}")


class HostKeyError(RemoteError):
    """``offered``: the key the server showed (algorithm and fingerprint), to check with the admins."""

    def __init__(self, cluster: str, host: str, port: int, known_hosts: str, changed: bool,
                 offered: str | None = None):
        self.host = host
        self.port = port
        self.known_hosts = known_hosts
        self.changed = changed
        self.offered = offered
        self.cause = "its host key changed" if changed else "its host key is not trusted yet"
        target = host_pattern(host, port)
        if changed:
            offers = f" The server now offers the {offered}." if offered else ""
            detail = (
                f"WARNING: the host key of {target} does not match the one "
                f"recorded in {known_hosts}. Someone may be intercepting the "
                f"connection, or the host was reinstalled. The connection was "
                f"closed before the login: no password or key was offered to it, "
                f"and nothing was read from it.{offers} If the change is expected, remove the old entry "
                f"with: ssh-keygen -R '{target}' -f {known_hosts}, then add "
                f"the new key."
            )
        else:
            offers = f"The server offers the {offered}; after" if offered else "After"
            detail = (
                f"the host key of {target} is not in {known_hosts}, so the "
                f"server cannot be verified: the connection was closed before "
                f"the login, and nothing was read from it. "
                f"{offers} checking it with the cluster's admins, add it "
                f"with: ssh-keyscan -p {port} {host} >> {known_hosts} (or, to "
                f"trust a cluster's key on first use, set \"host_key_policy\": "
                f"\"accept-new\" for it)."
            )
        super().__init__(cluster, detail)


class RemoteDirectoryError(RemoteError):
    cause = "remote_dir cannot be listed"

    def __init__(self, cluster: str, remote_dir: str, reason: str):
        self.remote_dir = remote_dir
        super().__init__(
            cluster,
            f"the remote directory {remote_dir} cannot be listed ({reason}). "
            f"Check remote_dir in the configuration.",
        )


class NoCheckpointsError(RemoteError):
    cause = "no file in remote_dir matches its pattern"

    def __init__(self, cluster: str, remote_dir: str, patterns: Iterable[str]):
        self.remote_dir = remote_dir
        self.patterns = list(patterns)
        super().__init__(
            cluster,
            f"no checkpoint files matching {', '.join(self.patterns)} in "
            f"{remote_dir}.",
        )


class UnsafeRemoteNameError(RemoteError):
    cause = "the server listed names that are not plain file names"

    def __init__(self, cluster: str, name: str, why: str):
        self.name = name
        super().__init__(
            cluster,
            f"the server listed a file named {name!r}, which {why}; it was "
            f"refused and nothing was written for it.",
        )


class TransferError(RemoteError):
    retryable = True
    rerun_fixes = True
    cause = "the link dropped or the server failed a read"

    def __init__(self, cluster: str, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(cluster, f"transfer of {name} failed: {reason}")


class RemoteFileDeniedError(RemoteError):
    """The account may not read one listed file (another owner, mode 600): said at once,
    not retried (a rerun gets no further until its owner or mode changes); the
    cluster's other files go on."""

    retryable = False
    rerun_fixes = False
    cause = "permission denied on the cluster"

    def __init__(self, cluster: str, name: str, username: str, path: str = ""):
        self.name = name
        self.username = username
        self.path = path or name
        self.cause = f"permission denied reading {name} as {username!r}"
        super().__init__(
            cluster,
            f"permission denied: the account {username!r} may not read {self.path} (another owner, "
            f"or mode 600?). Ask its owner to make it readable (chmod a+r, or g+r with a shared group), "
            f"or leave it out with the cluster's `patterns`; the other files were synced.",
        )


class RemoteFileGoneError(RemoteError):
    """A listed file was deleted on the cluster before it could be read (a purge, or
    a re-split in progress): its own outcome, not a failure of the cluster's sync;
    the listing saved for the merge is the one taken after it, without the file."""

    retryable = False
    rerun_fixes = True
    cause = "a listed file was deleted on the cluster"

    def __init__(self, cluster: str, name: str):
        self.name = name
        super().__init__(cluster, f"{name} was deleted on the cluster after it was listed (a purge, or a "
                                  f"re-split in progress?): not fetched, and left out of this sync's listing.")


class ConnectionDroppedError(TransferError):
    """The connection a transfer used went away. The link notices the drop
    and says it once for every file in flight; a file whose error comes
    late, from the old connection after the reconnect, is part of it too."""


class LinkLostError(RemoteError):
    """The cluster was reached in this run; then its connection dropped and
    every reconnect failed. The configuration is right (it connected): the
    link is what failed, and a rerun resumes. ``drops``: established
    connections lost in this run; ``attempts``: reconnects tried after the
    last; ``last_cause``: how the last one failed, in plain words; ``kept``:
    what is kept and verified ("1.8 MiB of big.npy"), "" for nothing."""

    retryable = False  # the reconnects already used up --retries
    rerun_fixes = True

    def __init__(self, cluster: str, host: str, port: int, *, drops: int, attempts: int,
                 last_cause: str, kept: str):
        self.host = host
        self.port = port
        self.drops = drops
        self.attempts = attempts
        self.last_cause = last_cause
        self.kept = kept
        lost = "was lost" if drops == 1 else f"was lost {drops} times in this run"
        tries = "the attempt to reconnect" if attempts == 1 else f"{attempts} attempts in a row to reconnect"
        self.cause = f"the connection dropped and reconnecting failed ({last_cause})"
        rerun = "run the same command again to resume from there" if kept else "run the same command again"
        kept_now = f"Kept, verified: {kept}; {rerun}" if kept else rerun[0].upper() + rerun[1:]
        super().__init__(
            cluster,
            f"the connection to {host}:{port} {lost}, and {tries} failed (the last: {last_cause}). "
            f"It had connected earlier in this run, so the host name, port and login are right: "
            f"the link itself dropped (the network, or the server). {kept_now} once the link holds "
            f"(on an unsteady link, raise --retries).",
        )


class StillBeingWrittenError(RemoteError):
    """The file is being written on the cluster: it changed while it was
    copied, or its last write is within the settle window. Not retried in
    this run (it would change under the next copy too): its verified bytes
    stay a partial, which the next sync, or ``--follow``'s next poll, resumes.
    ``why``: what showed it ("it grew from 6.0 MiB to 8.5 MiB while it was
    copied"); ``kept``: the bytes kept as a partial."""

    rerun_fixes = True
    cause = "files still being written on the server"

    def __init__(self, cluster: str, name: str, why: str, kept: str = ""):
        self.name = name
        self.why = why
        self.kept_here = f"{kept} of it is kept as a partial" if kept else "what was copied is kept as a partial"
        super().__init__(
            cluster,
            f"{name} is still being written ({why}): {self.kept_here}, and nothing was put in its place. "
            f"Run again once its job has finished writing it, or add --follow to wait for it.",
        )

    def while_following(self) -> str:
        """The same, as ``--follow`` says it: it is waiting for the file already."""
        return (f"Cluster {self.cluster!r}: {self.name} is still being written ({self.why}): {self.kept_here}; "
                f"it is fetched once it settles.")


class NotACheckpointError(RemoteError):
    """A file complete and verified here changed on the cluster, and its new version, fetched
    whole and matching the server's sha256, is not a readable checkpoint (cut short, damaged):
    the verified copy stays in place, the new version a partial. A rerun gets the same
    version: the cluster's file needs a look (or its job is still rewriting it)."""

    rerun_fixes = False
    cause = "a changed file on the cluster is not a readable checkpoint"

    def __init__(self, cluster: str, name: str, change: str, why: str):
        self.name = name
        self.change = change
        self.why = why = why.rstrip(". ")
        super().__init__(
            cluster,
            f"{name} changed on the cluster ({change}), and the new version is not a readable checkpoint "
            f"({why}): the verified copy here was kept, and the new version stays a partial. If its job is "
            f"rewriting it, run again once it is done; if the cluster's file was cut short or damaged, "
            f"restore it there.",
        )


class VerificationError(AsyncEmbedSyncError):
    rerun_fixes = True
    cause = "a download did not match the server's sha256"

    def __init__(self, cluster: str, name: str, detail: str):
        self.cluster = cluster
        self.name = name
        super().__init__(
            f"Cluster {cluster!r}: {name} failed verification ({detail}); the "
            f"download was discarded and not moved into place."
        )


class SyncFailedError(AsyncEmbedSyncError):
    """Raised after the per-cluster errors were shown: it sums them up, it does
    not repeat them. ``failures``: per cluster, its first error and what it
    lacks; ``still_writing``: per cluster, the files still being written
    there, named (the closing line is what a user reads last)."""

    def __init__(self, failures: dict[str, tuple[AsyncEmbedSyncError, str]], *, anything_fetched: bool = True,
                 still_writing: dict[str, list[str]] | None = None):
        """``anything_fetched``: whether this run downloaded, resumed or found any file (a
        login refused everywhere has nothing to keep, and saying so would be noise)."""
        self.failures = failures
        self.still_writing = still_writing or {}
        self.rerun_fixes = all(error.rerun_fixes for error, _ in failures.values())
        parts = []
        for cluster, (error, lacking) in sorted(failures.items()):
            advice = getattr(error, "rerun_advice", None) or (
                "a rerun resumes" if error.rerun_fixes else "fix this first: a rerun alone will not")
            parts.append(f"{cluster}: {error.cause}{f', {lacking}' if lacking else ''} ({advice})")
        for cluster, names in sorted(self.still_writing.items()):
            shown = some_names(names)
            parts.append(f"{cluster}: still being written there: {shown} (run again once their jobs have "
                         f"written them, or add --follow to wait for them)")
        if self.rerun_fixes:
            closing = ("What was verified is kept: running the same command again resumes where it stopped."
                       if anything_fetched else "Nothing was downloaded: run the same command again.")
        elif anything_fetched:
            closing = ("What was verified is kept; once the errors above are fixed as they say, the same "
                       "command resumes where it stopped.")
        else:
            closing = "Nothing was downloaded; fix the errors above as they say, then run the same command again."
        super().__init__(f"The sync did not finish. {'; '.join(parts)}. {closing}")


class FollowGaveUpError(AsyncEmbedSyncError):
    """``--follow`` waited ``--max-wait`` and the set is still not complete. ``lacking``:
    what is missing, in a few words each (files still being written, rows not here)."""

    rerun_fixes = True
    cause = "the set was not complete when --max-wait ran out"

    def __init__(self, waited: str, lacking: list[str]):
        self.lacking = lacking
        super().__init__(f"Gave up waiting after {waited} (--max-wait): {'; '.join(lacking)}. Nothing was "
                         f"merged; what was verified is kept, and the same command goes on from there.")


# ---------------------------------------------------------------------- merge


class CheckpointError(AsyncEmbedSyncError):
    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"Checkpoint {path}: {problem}")

    @classmethod
    def unreadable(cls, exc: OSError, path: str | os.PathLike,
                   checkpoint: str | os.PathLike | None = None) -> CheckpointError:
        """``path`` (a checkpoint's file) could not be read: said of ``checkpoint``, ``path`` by default."""
        return cls(str(checkpoint or path), f"cannot be read: {os_error_problem(exc, path)}")


class UnsafePickleError(CheckpointError):
    def __init__(self, path: str, global_name: str):
        self.global_name = global_name
        super().__init__(
            path,
            f"the pickle asks to load {global_name}, which is not a numpy "
            f"array or a plain container; it was refused without running "
            f"anything. The file may be corrupt or malicious.",
        )


class MergeValidationError(AsyncEmbedSyncError):
    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"The checkpoints cannot be merged: {problem}")


_PARTIAL_HINT = "add --partial to merge only what is there, on purpose"


class ClustersLeftOutError(AsyncEmbedSyncError):
    """A result without a configured cluster's rows would look complete: refused before anything runs."""

    def __init__(self, source: str, merged: Iterable[str], left_out: Iterable[str]):
        self.source = source
        self.merged = sorted(merged)
        self.left_out = sorted(left_out)
        names = ", ".join(self.left_out)
        super().__init__(
            f"Nothing was run: --clusters {' '.join(self.merged)} leaves out {names}, which {source} also "
            f"configures: the result would lack {'its' if len(self.left_out) == 1 else 'their'} "
            f"rows and still look complete. Run without --clusters to sync and merge every "
            f"cluster, use `sync --clusters ...` to only download, or {_PARTIAL_HINT}."
        )


class RowsMissingError(MergeValidationError):
    """The checkpoints end before the total the run declared (or a checkpoint carries)."""

    def __init__(self, declared_rows: int, declared_by: str, end: int, last_path: str):
        self.declared_rows = declared_rows
        self.declared_by = declared_by
        self.end = end
        super().__init__(
            f"rows {end:,}..{declared_rows - 1:,} are missing: the run has {declared_rows:,} rows "
            f"({declared_by}) but the last checkpoint, {last_path}, ends at {end:,}. Is a cluster "
            f"missing from the download directory or from --clusters, or did a GPU's job not "
            f"finish? Or {_PARTIAL_HINT}."
        )


class OutputError(AsyncEmbedSyncError):
    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"Output {path}: {problem}")


# ------------------------------------------------------------------- stopping


class Terminated(BaseException):
    """SIGTERM asked the command to stop; the CLI exits 143.

    A ``BaseException``, as ``KeyboardInterrupt`` is: no ``except Exception``
    on its way out takes it for a failure, and every cleanup runs.
    """
