"""Every error the tool raises on purpose, in one tree.

Each class builds its own one-paragraph message from the fields it is given,
so that the CLI can print ``str(exc)`` and nothing else: no traceback, no
secret (no class here takes a password or key material as a field).

::

    AsyncEmbedSyncError                  anything the CLI turns into exit code 1
    ├── ConfigError                      credentials file / cluster settings
    │   ├── UnknownClusterError          --clusters names a cluster not configured
    │   └── KeyPermissionError           private key readable by group/others
    ├── DownloadDirLockedError           another run holds the download directory
    ├── LocalFileError                   a local file cannot be written (disk full...)
    ├── RemoteError                      one cluster; carries ``cluster``
    │   ├── ConnectError                 host unreachable, refused, timed out
    │   ├── AuthenticationError          server refused every credential
    │   ├── HostKeyError                 host key unknown or changed
    │   ├── RemoteDirectoryError         remote_dir missing or unreadable
    │   ├── NoCheckpointsError           remote_dir holds no matching files
    │   ├── UnsafeRemoteNameError        a listed name is not a plain file name
    │   ├── TransferError                link dropped or the server failed a read
    │   └── RemoteFileChangedError       remote file changed size/mtime mid-copy
    ├── VerificationError                downloaded bytes do not match the remote
    ├── SyncFailedError                  summary: some clusters did not sync
    ├── CheckpointError                  one checkpoint file is unreadable or unsafe
    │   └── UnsafePickleError            pickle asks for a global we do not allow
    ├── MergeValidationError             shards disagree: gap, overlap, dim, model
    └── OutputError                      the merged result cannot be written/read

``TransferError`` and ``RemoteFileChangedError`` are the retryable ones: the
sync scheduler reconnects and resumes on them; everything else is final.

``Terminated`` stands outside the tree: SIGTERM's stop, a ``BaseException``
as ``KeyboardInterrupt`` is (see ``termination.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from .known_hosts import host_pattern


class AsyncEmbedSyncError(Exception):
    """Base class: ``str(exc)`` is a complete message for the user."""


# --------------------------------------------------------------------- config


class ConfigError(AsyncEmbedSyncError):
    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"Configuration error in {source}: {problem}")


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
    def __init__(self, directory: str, holder: str):
        self.directory = directory
        self.holder = holder
        super().__init__(
            f"The download directory {directory} is in use by another run "
            f"({holder}). Wait for it to finish, or stop it; two runs must "
            f"never write the same partial files."
        )


class LocalFileError(AsyncEmbedSyncError):
    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(
            f"Cannot write {path}: {problem}. What was already verified is "
            f"kept; free the space or fix the permissions and run the same "
            f"command again to resume."
        )


# --------------------------------------------------------------------- remote


class RemoteError(AsyncEmbedSyncError):
    """An error that belongs to one cluster."""

    retryable = False

    def __init__(self, cluster: str, detail: str):
        self.cluster = cluster
        self.detail = detail
        super().__init__(f"Cluster {cluster!r}: {detail}")


class ConnectError(RemoteError):
    def __init__(self, cluster: str, host: str, port: int, reason: str):
        self.host = host
        self.port = port
        super().__init__(
            cluster,
            f"cannot connect to {host}:{port} ({reason}). Check the host name "
            f"and port in the configuration, and that the machine is reachable "
            f"(for example with: ssh -p {port} {host}).",
        )


class AuthenticationError(RemoteError):
    def __init__(self, cluster: str, username: str, host: str, methods: str):
        self.username = username
        self.host = host
        super().__init__(
            cluster,
            f"authentication as {username!r} on {host} failed ({methods}). "
            f"Check the username and the key_file or password in the "
            f"configuration, or load the key into ssh-agent.",
        )


class HostKeyError(RemoteError):
    def __init__(self, cluster: str, host: str, port: int, known_hosts: str, changed: bool):
        self.host = host
        self.port = port
        self.known_hosts = known_hosts
        self.changed = changed
        target = host_pattern(host, port)
        if changed:
            detail = (
                f"WARNING: the host key of {target} does not match the one "
                f"recorded in {known_hosts}. Someone may be intercepting the "
                f"connection, or the host was reinstalled. Nothing was "
                f"downloaded. If the change is expected, remove the old entry "
                f"with: ssh-keygen -R '{target}' -f {known_hosts}, then add "
                f"the new key."
            )
        else:
            detail = (
                f"the host key of {target} is not in {known_hosts}, so the "
                f"server cannot be verified and nothing was downloaded. After "
                f"checking the fingerprint with the cluster's admins, add it "
                f"with: ssh-keyscan -p {port} {host} >> {known_hosts} (or, to "
                f"trust a cluster's key on first use, set \"host_key_policy\": "
                f"\"accept-new\" for it)"
            )
        super().__init__(cluster, detail)


class RemoteDirectoryError(RemoteError):
    def __init__(self, cluster: str, remote_dir: str, reason: str):
        self.remote_dir = remote_dir
        super().__init__(
            cluster,
            f"the remote directory {remote_dir} cannot be listed ({reason}). "
            f"Check remote_dir in the configuration.",
        )


class NoCheckpointsError(RemoteError):
    def __init__(self, cluster: str, remote_dir: str, patterns: Iterable[str]):
        self.remote_dir = remote_dir
        self.patterns = list(patterns)
        super().__init__(
            cluster,
            f"no checkpoint files matching {', '.join(self.patterns)} in "
            f"{remote_dir}.",
        )


class UnsafeRemoteNameError(RemoteError):
    def __init__(self, cluster: str, name: str, why: str):
        self.name = name
        super().__init__(
            cluster,
            f"the server listed a file named {name!r}, which {why}; it was "
            f"refused and nothing was written for it.",
        )


class TransferError(RemoteError):
    retryable = True

    def __init__(self, cluster: str, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__(cluster, f"transfer of {name} failed: {reason}")


class RemoteFileChangedError(RemoteError):
    retryable = True

    def __init__(self, cluster: str, name: str, what: str):
        self.name = name
        super().__init__(
            cluster,
            f"{name} changed on the server while it was being copied ({what}); "
            f"nothing was put in its place. Is it still being written?",
        )


class VerificationError(AsyncEmbedSyncError):
    def __init__(self, cluster: str, name: str, detail: str):
        self.cluster = cluster
        self.name = name
        super().__init__(
            f"Cluster {cluster!r}: {name} failed verification ({detail}); the "
            f"download was discarded and not moved into place."
        )


class SyncFailedError(AsyncEmbedSyncError):
    """Raised after the per-cluster errors were shown: it sums up, it does
    not repeat them."""

    def __init__(self, missing: dict[str, str]):
        self.missing = missing
        parts = "; ".join(f"{cluster}: {what}" for cluster, what in sorted(missing.items()))
        super().__init__(
            f"The sync did not finish ({parts}; the errors are above). What was "
            f"verified is kept: running the same command again resumes where it stopped."
        )


# ---------------------------------------------------------------------- merge


class CheckpointError(AsyncEmbedSyncError):
    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = problem
        super().__init__(f"Checkpoint {path}: {problem}")


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
