"""Remote access to one cluster: the only module that imports asyncssh.

One ``ClusterRemote`` is one SSH connection, reached as ``ssh`` would reach
it (``resolve_target``: the OpenSSH client config, ProxyJump hops, host keys
always verified, passwords/passphrases/2FA codes asked through a
``prompts.Prompter``). On it:

* a small pool of SFTP channels: each channel has its own receive window,
  and one window caps a channel at window / RTT (field notes), so files in
  flight are spread over several channels instead of sharing one;
* reads at byte offsets, pipelined, in the block size the server allows;
* ``sha256sum`` over an exec channel when the remote has a shell;
* where the server has no SFTP subsystem, ``shell_access`` over exec
  channels instead (``method`` says which).

Every asyncssh error is translated to an ``errors`` class in one place,
``_translate_errors``; nothing above this module sees an asyncssh type.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fnmatch
import functools
import getpass
import logging
import os
import posixpath
import re
import shlex
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import asyncssh
from asyncssh.config import SSHClientConfig

from ..config import DEFAULT_KNOWN_HOSTS, ClusterConfig
from ..errors import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectionDroppedError,
    HostKeyError,
    KeyProblem,
    RemoteDirectoryError,
    RemoteError,
    TransferError,
    UnsafeRemoteNameError,
)
from ..known_hosts import append_known_host, host_pattern
from .prompts import NoPrompter, NoTerminal, Prompter
from .shell import ShellAccess

logger = logging.getLogger(__name__)

# 16 MiB per channel: at 50 ms RTT one channel then carries up to 320 MiB/s,
# instead of the 40 MiB/s that asyncssh's 2 MiB default allows.
DEFAULT_WINDOW = 16 * 1024 * 1024
# OpenSSH's sftp-server advertises 261,120 bytes; asyncssh's own server 4 MiB.
# Larger blocks gain nothing past ~256 KiB and cost memory per request.
MAX_BLOCK_SIZE = 256 * 1024
# Bytes requested ahead of the write position, per file: enough to fill a
# 400 Mbit/s x 50 ms link (2.5 MB) with room to spare.
READ_AHEAD_BYTES = 8 * 1024 * 1024
# OpenSSH's default MaxSessions is 10 channels per connection: SFTP channels
# plus exec channels for sha256sum must stay below it.
DEFAULT_SFTP_CHANNELS = 4
MAX_CONCURRENT_HASHES = 2
HASH_BATCH = 64
# AES-GCM first: with AES-NI, decrypting it costs far less CPU than asyncssh's
# default first choice, chacha20-poly1305 (1.08 GB over loopback: 8.9 s ->
# 7.7 s). The rest of asyncssh's defaults follow, for servers without it.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")
MAX_NAME_BYTES = 255
DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
# How long the reads still in flight when a file ends early or the link drops
# may take to come back: on a live link, about one RTT; at close, after the
# connection is aborted, no time at all. Reads abandoned by a stop (Ctrl-C,
# SIGTERM) are not waited for: a slow link would keep delivering their bytes.
READ_SETTLE_TIMEOUT = 1.0
SETTLE_TIMEOUT = 5.0


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    mtime: int


@dataclass(frozen=True)
class Listing:
    files: list[RemoteFile]
    refused: list[UnsafeRemoteNameError]


def check_remote_name(cluster: str, name: str) -> None:
    """Refuse a server-supplied name that is not a plain file name.

    Names become local paths: ``../x``, ``/etc/x``, ``a/b``, ``a\\b``, NUL,
    or an over-long name must never reach the file system.
    """
    why = None
    if name in ("", ".", ".."):
        why = "is not a file name"
    elif "/" in name or "\\" in name:
        why = "contains a path separator"
    elif "\0" in name:
        why = "contains a NUL byte"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "contains control characters"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        why = f"is longer than {MAX_NAME_BYTES} bytes"
    if why:
        raise UnsafeRemoteNameError(cluster, name, why)


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect and as whom, once the OpenSSH client config had its say.

    The cluster's own fields win; what they leave out comes from the ssh
    config (``ssh_config``, else ``~/.ssh/config``), then from ssh's defaults.
    """

    cluster: ClusterConfig
    host: str  # as configured: a host name or a Host alias
    hostname: str  # after the config's HostName
    port: int
    username: str
    identity_files: tuple[str, ...]  # empty: the agent and ~/.ssh/id_*
    known_hosts: tuple[Path, ...]
    proxy_jump: tuple[str, ...]  # hops, outermost first
    ssh_config: tuple[str, ...]

    def trusted_files(self) -> list[Path]:
        """Every existing file whose keys are trusted for this target."""
        candidates = (*self.known_hosts, self.cluster.project_known_hosts_path)
        return [p for p in dict.fromkeys(candidates) if p.is_file()]

    def hop(self, spec: str) -> SSHTarget:
        """The target for one ProxyJump hop, ``[user@]host[:port]``."""
        user, _, host_port = spec.rpartition("@")
        host, _, port = host_port.partition(":")
        if host.startswith("[") and "]" in host_port:  # [v6addr]:port
            host, _, port = host_port[1:].partition("]")
            port = port.lstrip(":")
        hop_cluster = dataclasses.replace(self.cluster, host=host, port=int(port) if port else None,
                                          username=user or None, proxy_jump=None, password=None)
        return resolve_target(hop_cluster)


def resolve_target(cluster: ClusterConfig) -> SSHTarget:
    paths = [str(_expand(cluster.ssh_config))] if cluster.ssh_config else (
        [str(DEFAULT_SSH_CONFIG.expanduser())] if os.access(DEFAULT_SSH_CONFIG.expanduser(), os.R_OK) else [])
    try:
        ssh = SSHClientConfig.load(None, paths, False, False, False, _local_username(),
                                   cluster.username or (), cluster.host, cluster.port or ())
    except (OSError, ValueError, asyncssh.Error) as exc:
        raise ConfigError(cluster.source, f"cluster {cluster.name!r}: the ssh config "
                                          f"{', '.join(paths)} cannot be read ({exc}).") from exc
    known_hosts = [cluster.known_hosts] if cluster.known_hosts else (
        ssh.get("UserKnownHostsFile") or [DEFAULT_KNOWN_HOSTS])
    identity = [cluster.key_file] if cluster.key_file else list(ssh.get("IdentityFile") or [])
    jump = cluster.proxy_jump if cluster.proxy_jump is not None else ssh.get("ProxyJump")
    return SSHTarget(
        cluster=cluster,
        host=cluster.host,
        hostname=ssh.get("Hostname") or cluster.host,
        port=cluster.port or ssh.get("Port") or 22,
        username=cluster.username or ssh.get("User") or _local_username(),
        identity_files=tuple(str(_expand(p)) for p in identity),
        known_hosts=tuple(_expand(p) for p in known_hosts),
        proxy_jump=tuple(h.strip() for h in (jump or "").split(",") if h.strip() and h.strip() != "none"),
        ssh_config=tuple(paths),
    )


class ClusterRemote:
    """One authenticated SSH connection to one cluster (through its jump
    hosts, if any), and the files on it.

    Files are reached over SFTP; where the server has its SFTP subsystem
    switched off, over exec channels running ``tail``/``find``/``stat``
    (``method`` says which).
    """

    def __init__(self, target: SSHTarget, connection: asyncssh.SSHClientConnection,
                 jumps: list[asyncssh.SSHClientConnection], sftp_channels: int):
        self.cluster = target.cluster
        self.target = target
        self._connection = connection
        self._jumps = jumps
        self._sftp_pool: list[asyncssh.SFTPClient] = []
        self._sftp_users: list[int] = []
        self._sftp_channels = sftp_channels
        self._shell: ShellAccess | None = None
        self._hash_queue: list[tuple[str, asyncio.Future]] = []
        self._hash_workers: set[asyncio.Future] = set()
        self._has_shell: bool | None = None
        # Reads abandoned mid-flight (drop, stop): observed as they end, or at close.
        self._unsettled_reads: set[asyncio.Future] = set()

    @property
    def _answers_in_order(self) -> bool:
        version = self._connection.get_extra_info("server_version") or ""
        return version.startswith("SSH-2.0-OpenSSH")

    @property
    def method(self) -> str:
        return "exec" if self._shell is not None else "sftp"

    # ---------------------------------------------------------------- connect

    @classmethod
    async def connect(cls, cluster: ClusterConfig, *, timeout: float = 30.0,
                      window: int = DEFAULT_WINDOW,
                      sftp_channels: int = DEFAULT_SFTP_CHANNELS,
                      prompter: Prompter | None = None) -> ClusterRemote:
        """Connect and authenticate; host keys are always verified.

        ``timeout`` bounds the connect and login, and (through keepalives)
        how long a silently dead link goes unnoticed. ``prompter`` answers
        what the configuration does not: passwords, passphrases, 2FA codes.
        """
        prompter = prompter or NoPrompter()
        target = resolve_target(cluster)
        options = dict(
            connect_timeout=timeout,
            login_timeout=timeout,
            # Dead link noticed after about ``timeout``: 4 unanswered
            # keepalives, one every timeout / 4.
            keepalive_interval=max(timeout / 4, 0.1),
            keepalive_count_max=3,
            window=window,
            max_pktsize=256 * 1024,
            encryption_algs=list(PREFERRED_CIPHERS),
        )
        jumps: list[asyncssh.SSHClientConnection] = []
        try:
            tunnel = None
            for spec in target.proxy_jump:
                tunnel = await _connect_verified(target.hop(spec), options, prompter, timeout, tunnel)
                jumps.append(tunnel)
            connection = await _connect_verified(target, options, prompter, timeout, tunnel)
        except BaseException:
            for jump in reversed(jumps):
                jump.abort()
            raise
        remote = cls(target, connection, jumps, sftp_channels)
        try:
            await remote._open_channels()
        except BaseException:
            await remote.close()
            raise
        return remote

    async def close(self) -> None:
        for worker in self._hash_workers:
            worker.cancel()
        _fail_waiters(self._hash_queue, asyncssh.ConnectionLost("the connection was closed"))
        self._hash_queue = []
        if self._unsettled_reads:
            # A stalled link would never flush a polite close.
            self._connection.abort()
        else:
            self._connection.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(SETTLE_TIMEOUT):
            with contextlib.suppress(Exception):
                await self._connection.wait_closed()
        await _settle(self._unsettled_reads)
        self._unsettled_reads.clear()
        for jump in reversed(self._jumps):
            jump.close()

    @property
    def is_closed(self) -> bool:
        return self._connection.is_closed()

    async def __aenter__(self) -> ClusterRemote:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # ------------------------------------------------------------------ files

    async def list_checkpoints(self) -> Listing:
        """Regular files in remote_dir matching the cluster's patterns, by name."""
        files: list[RemoteFile] = []
        refused: list[UnsafeRemoteNameError] = []
        async for entry in self.scan_checkpoints():
            (refused if isinstance(entry, UnsafeRemoteNameError) else files).append(entry)
        files.sort(key=lambda f: f.name)
        return Listing(files, refused)

    async def scan_checkpoints(self) -> AsyncIterator[RemoteFile | UnsafeRemoteNameError]:
        """The checkpoints as the listing arrives, so downloads can start
        before the server has sent the last directory entry; a name that is
        not a plain file name comes as the error that refuses it."""
        remote_dir = self.cluster.remote_dir
        with _translate_errors(self.target, remote_dir=remote_dir):
            entries = self._shell.scan(remote_dir) if self._shell else self._sftp_scan(remote_dir)
            async for name, size, mtime in entries:
                if not any(fnmatch.fnmatchcase(name, p) for p in self.cluster.patterns):
                    continue
                try:
                    check_remote_name(self.cluster.name, name)
                except UnsafeRemoteNameError as exc:
                    yield exc
                    continue
                yield RemoteFile(name, size, mtime)

    async def _sftp_scan(self, remote_dir: str) -> AsyncIterator[tuple[str, int, int]]:
        """(name, size, mtime) of the regular files, symlinks followed."""
        with self._sftp() as sftp:
            async for entry in sftp.scandir(remote_dir):
                name = entry.filename
                if not isinstance(name, str):
                    name = name.decode("utf-8", "surrogateescape")
                if name in (".", ".."):
                    continue
                attrs = entry.attrs
                if attrs.type == asyncssh.FILEXFER_TYPE_SYMLINK:
                    attrs = await sftp.stat(self._path(name))
                if attrs.type in (asyncssh.FILEXFER_TYPE_REGULAR, asyncssh.FILEXFER_TYPE_UNKNOWN):
                    yield name, attrs.size or 0, int(attrs.mtime or 0)

    async def stat(self, name: str) -> RemoteFile:
        with _translate_errors(self.target, name=name):
            if self._shell:
                return RemoteFile(name, *await self._shell.stat(self._path(name), name))
            with self._sftp() as sftp:
                attrs = await sftp.stat(self._path(name))
        return RemoteFile(name, attrs.size or 0, int(attrs.mtime or 0))

    async def read_in_order(self, name: str, offset: int,
                            end: int) -> AsyncIterator[bytes | RemoteFile]:
        """Yield the bytes of ``[offset, end)`` in order, as they arrive, then
        the file's size and mtime as the server reports them after the reads.

        Up to READ_AHEAD_BYTES of block reads are in flight at once (one
        window / RTT would otherwise cap the rate); the caller only ever sees
        a contiguous, growing prefix, and at most the read-ahead is held in
        memory. The closing stat must describe the file after the reads:
        OpenSSH's sftp-server answers a channel's requests in order, so there
        it is sent right behind the last read and costs no round trip; a
        server that may answer concurrently (asyncssh's own) gets it only
        once the last read is answered.
        Iteration stops early, without the stat, if the remote file is
        shorter than ``end``: the caller compares what it got with what it
        expected.

        asyncssh's ``read_parallel`` is not used: abandoning its iterator
        (a drop, a cancel) leaves its reads running unobserved.
        """
        if self._shell:
            async for piece in self._shell_read(name, offset, end):
                yield piece
            return
        with _translate_errors(self.target, name=name):
            with self._sftp() as sftp:
                block_size = min(sftp.limits.max_read_len or MAX_BLOCK_SIZE, MAX_BLOCK_SIZE)
                max_requests = max(4, READ_AHEAD_BYTES // block_size)
                async with sftp.open(self._path(name), "rb", block_size=block_size) as remote_file:
                    in_flight: dict[int, asyncio.Future[bytes]] = {}
                    closing_stat: asyncio.Future | None = None
                    next_request = position = offset
                    abandoned = False
                    try:
                        while True:
                            while next_request < end and len(in_flight) < max_requests:
                                size = min(block_size, end - next_request)
                                in_flight[next_request] = asyncio.ensure_future(
                                    remote_file.read(size, next_request))
                                next_request += size
                            if closing_stat is None and next_request >= end and (
                                    self._answers_in_order or position >= end):
                                closing_stat = asyncio.ensure_future(remote_file.stat())
                            if position >= end:
                                break
                            # Shielded: a cancel must not cancel the read itself (see _settle).
                            data = await asyncio.shield(in_flight[position])
                            del in_flight[position]
                            if not data:
                                return  # the file ends early: it shrank
                            position += len(data)
                            yield data
                            if position < next_request and position not in in_flight:
                                # A short read (end of file moved): ask for the gap.
                                gap_end = min((o for o in in_flight if o > position), default=next_request)
                                in_flight[position] = asyncio.ensure_future(
                                    remote_file.read(gap_end - position, position))
                        attrs = await asyncio.shield(closing_stat)
                        yield RemoteFile(name, attrs.size or 0, int(attrs.mtime or 0))
                    except (asyncio.CancelledError, GeneratorExit):
                        # A stop, or the caller gave up on the file: nobody
                        # waits for these bytes any more.
                        abandoned = True
                        raise
                    finally:
                        requests = [*in_flight.values(), *filter(None, [closing_stat])]
                        if abandoned:
                            # Not waited for: on a slow link the read-ahead
                            # takes far longer than a round trip to arrive,
                            # and the transfer would go on that long after a
                            # Ctrl-C. They end on their own, or at close().
                            self._abandon(requests)
                        else:
                            await _settle(requests, timeout=READ_SETTLE_TIMEOUT)
                            self._unsettled_reads.update(r for r in requests if not r.done())

    def _abandon(self, requests: list[asyncio.Future]) -> None:
        """Let ``requests`` end without anyone waiting for them; each is
        observed when it ends (its error is not news), and until then it is
        unsettled: ``close()`` aborts the connection rather than wait on it."""
        for request in requests:
            if request.done():
                observe_outcome(request)
                continue
            self._unsettled_reads.add(request)
            request.add_done_callback(self._settled)

    def _settled(self, request: asyncio.Future) -> None:
        self._unsettled_reads.discard(request)
        observe_outcome(request)

    async def sha256(self, name: str) -> str | None:
        """The remote's ``sha256sum`` of the file, or None without a shell.

        Requests are batched, one ``sha256sum -- a b c ...`` per batch and at
        most MAX_CONCURRENT_HASHES at once: a session per file costs ~0.1 s
        of setup each, which dominates with many small checkpoints.
        """
        if self._has_shell is False:
            return None
        path = self._path(name)
        answer = asyncio.get_running_loop().create_future()
        self._hash_queue.append((path, answer))
        if len(self._hash_workers) < MAX_CONCURRENT_HASHES:
            worker = asyncio.ensure_future(self._hash_batches())
            self._hash_workers.add(worker)
            worker.add_done_callback(self._hash_workers.discard)
        with _translate_errors(self.target, name=name):
            return await answer

    async def _hash_batches(self) -> None:
        while self._hash_queue:
            batch, self._hash_queue = self._hash_queue[:HASH_BATCH], self._hash_queue[HASH_BATCH:]
            try:
                digests = await self._sha256sum([path for path, _ in batch])
            except BaseException as exc:  # a drop, or close(): each waiting file learns of it
                _fail_waiters(batch, exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            for path, answer in batch:
                if not answer.done():
                    answer.set_result(digests.get(path))

    async def _sha256sum(self, paths: list[str]) -> dict[str, str]:
        command = "sha256sum -- " + " ".join(shlex.quote(p) for p in paths)
        try:
            result = await self._connection.run(command, check=False)
        except asyncssh.ChannelOpenError:
            if self._connection.is_closed():
                raise
            self._has_shell = False  # the server refuses sessions: no shell
            return {}
        if result.exit_status in (126, 127):  # no sha256sum (or no shell) there
            self._has_shell = False
            return {}
        self._has_shell = True
        digests = {}
        for line in (result.stdout if isinstance(result.stdout, str) else "").splitlines():
            digest, _, path = line.partition("  ")
            if len(digest) == 64:
                digests[path] = digest.lower()
        return digests

    # --------------------------------------------------------------- channels

    def _path(self, name: str) -> str:
        return posixpath.join(self.cluster.remote_dir, name)

    async def _shell_read(self, name: str, offset: int, end: int) -> AsyncIterator[bytes | RemoteFile]:
        with _translate_errors(self.target, name=name):
            position = offset
            async with contextlib.aclosing(self._shell.read(self._path(name), name, offset, end)) as chunks:
                async for chunk in chunks:
                    position += len(chunk)
                    yield chunk
            if position == end:
                yield await self.stat(name)

    async def _open_channels(self) -> None:
        """Open the SFTP channel pool at once, concurrently: opened one by
        one as files start, each would cost the first files ~3 round trips.
        A server without an SFTP subsystem gets the exec fallback instead."""
        with _translate_errors(self.target):
            try:
                self._sftp_pool = list(await asyncio.gather(
                    *(self._connection.start_sftp_client() for _ in range(self._sftp_channels))))
            except (asyncssh.ChannelOpenError, asyncssh.SFTPError) as exc:
                if self._connection.is_closed():
                    raise  # a drop, not a server without SFTP
                shell = ShellAccess(self._connection, self.cluster.name)
                try:
                    has_shell = await shell.probe()
                except asyncssh.ChannelOpenError:
                    has_shell = False
                if not has_shell:
                    raise RemoteError(self.cluster.name, "the server offers neither SFTP nor a shell "
                                                         "to run commands, so files cannot be read "
                                                         "from it.") from exc
                self._shell = shell
        self._sftp_users = [0] * len(self._sftp_pool)

    @contextlib.contextmanager
    def _sftp(self) -> Iterator[asyncssh.SFTPClient]:
        """Lend the least-used SFTP channel of the pool."""
        index = self._sftp_users.index(min(self._sftp_users))
        self._sftp_users[index] += 1
        try:
            yield self._sftp_pool[index]
        finally:
            self._sftp_users[index] -= 1


async def _settle(requests, timeout: float = SETTLE_TIMEOUT) -> None:
    """Let abandoned reads finish, and observe how they ended.

    Cancelling an asyncssh read does not cancel the tasks it started inside
    asyncssh, whose errors would then go unobserved; so the reads are
    awaited instead. After a drop they fail at once; on a stalled link they
    stay pending until ``close()`` aborts the connection and settles them.
    """
    requests = list(requests)
    if not requests:
        return
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(timeout):
            await asyncio.wait(requests)
    for request in requests:
        if request.done():
            observe_outcome(request)


def observe_outcome(request: asyncio.Future) -> None:
    """Mark how a finished request ended as seen, so that asyncio does not report it as never retrieved."""
    if not request.cancelled():
        request.exception()  # observed: the caller already has the error that matters


def _expand(path: str) -> Path:
    return Path(path).expanduser()


def _fail_waiters(waiters: list[tuple[str, asyncio.Future]], exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError):
        exc = asyncssh.ConnectionLost("the connection was closed")
    for _, answer in waiters:
        if not answer.done():
            answer.set_exception(exc)


def _local_username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a bare container
        return "root"


class _Identities:
    """The configured key files, loaded as ``ssh`` loads them.

    A file that does not exist is skipped with a warning, as ssh does (real
    ``~/.ssh/config`` files name keys that are long gone). An encrypted key
    beside its ``.pub`` is decrypted only once the server accepts its public
    half (asyncssh defers it, as ssh does); its passphrase comes from the
    configuration, else from the person at the terminal. Why a key could not
    be used (no passphrase to be had, a wrong one, not a key) is told by
    ``problems()``, for the error that explains a refused login.
    """

    MAX_PASSPHRASE_PROMPTS = 3

    def __init__(self, target: SSHTarget, prompter: Prompter):
        self._target = target
        self._prompter = prompter
        self._unloadable: dict[str, KeyProblem] = {}
        self._loaded: dict[str, list[asyncssh.SSHKeyPair]] = {}
        self._passphrases: dict[str, str | None] = {}  # key file -> passphrase given for it

    def load(self) -> list[asyncssh.SSHKeyPair] | tuple[()]:
        """The key pairs to offer; ``()`` where none is configured or none could be
        loaded, which leaves it to asyncssh's defaults (ssh-agent, ``~/.ssh/id_*``)."""
        keys: list[asyncssh.SSHKeyPair] = []
        for path in self._target.identity_files:
            try:
                self._loaded[path] = asyncssh.load_keypairs([path], passphrase=self.passphrase)
                keys += self._loaded[path]
            except FileNotFoundError:
                logger.warning("cluster %r: no such identity: %s (skipped, as ssh does)",
                               self._target.cluster.name, path)
            except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
                self._unloadable[path] = self._why_unusable(path) or KeyProblem(
                    path, f"it is not a private key asyncssh can read ({exc})",
                    "point `key_file` at the private key (not the .pub)")
            except OSError as exc:
                self._unloadable[path] = KeyProblem(path, f"it cannot be read ({exc.strerror or exc})",
                                                    "check the path and that you may read it")
        return keys or ()

    def public_keys(self) -> list[bytes]:
        """The configured keys' public halves: ssh-agent offers only those, as
        with ``IdentitiesOnly``. Its other keys would be offered first, and
        six of them use up OpenSSH's ``MaxAuthTries``."""
        found = []
        for path in self._target.identity_files:
            for source in (f"{path}.pub", path):
                try:
                    found.append(asyncssh.read_public_key(source).public_data)
                    break
                except (OSError, asyncssh.KeyImportError):
                    continue
            else:
                found += [pair.public_data for pair in self._loaded.get(path, [])]
        return found

    def passphrase(self, filename: str) -> str | None:
        """The configured passphrase, else (for an encrypted key only) the person at the terminal."""
        answer = self._target.cluster.passphrase
        if answer is None and _is_encrypted(filename):
            answer = self._ask_passphrase(filename)
        self._passphrases[filename] = answer
        return answer

    def _ask_passphrase(self, filename: str) -> str | None:
        """Asked again after a typo, up to ``MAX_PASSPHRASE_PROMPTS`` times, as
        ssh does; an empty answer gives up at once, as in ssh."""
        prompt = f"[{self._target.cluster.name}] Passphrase for key {filename}: "
        answer = None
        for _ in range(self.MAX_PASSPHRASE_PROMPTS):
            try:
                answer = self._prompter.ask(prompt)
            except NoTerminal:
                return None
            if not answer or _decrypts(filename, answer):
                break
            prompt = f"[{self._target.cluster.name}] Bad passphrase, try again for {filename}: "
        return answer

    def problems(self) -> list[KeyProblem]:
        """Each configured key that could not be offered, and why; empty if every key was."""
        problems = dict(self._unloadable)
        for path in self._passphrases:
            if path not in problems and (problem := self._why_unusable(path)) is not None:
                problems[path] = problem
        return list(problems.values())

    def _why_unusable(self, path: str) -> KeyProblem | None:
        if path not in self._passphrases:
            return None
        given = self._passphrases[path]
        agent = f"load the key into ssh-agent (`ssh-add {path}`)"
        if given is None:
            return KeyProblem(path, "it is encrypted, and there is no passphrase for it: none in the "
                                    "configuration, and no terminal to ask for one",
                              f"set `passphrase` for this cluster, {agent}, or run the command in a terminal")
        if _decrypts(path, given) is False:  # only after a failure: the KDF is slow on purpose
            if self._target.cluster.passphrase is not None:
                return KeyProblem(path, "it is encrypted, and the configured `passphrase` does not decrypt it",
                                  f"correct `passphrase` for this cluster, or {agent}")
            return KeyProblem(path, "it is encrypted, and the passphrase typed does not decrypt it",
                              f"run the command again and type the key's passphrase, or {agent}")
        return None


def _decrypts(filename: str, passphrase: str) -> bool | None:
    """Whether ``passphrase`` opens the key; None where the file cannot be read."""
    try:
        asyncssh.read_private_key(filename, passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError):
        return False
    except OSError:
        return None
    return True


def _is_encrypted(filename: str) -> bool:
    try:
        asyncssh.read_private_key(filename)
    except (OSError, asyncssh.KeyImportError):
        return True
    return False


class _AuthClient(asyncssh.SSHClient):
    """Passwords and keyboard-interactive prompts (2FA codes): from the
    configuration, else asked through the prompter. A method nobody can
    answer (no terminal) is not attempted, and one whose attempt the server
    failed without a question is not attempted again: each attempt counts
    against the server's ``MaxAuthTries``, and a client that keeps trying
    is cut off with "Too many authentication failures", which reads like a
    connection problem. What was tried is kept for the error message."""

    MAX_PROMPTED_ATTEMPTS = 3

    def __init__(self, target: SSHTarget, prompter: Prompter, identities: _Identities):
        self._target = target
        self._prompter = prompter
        self.identities = identities
        self._connection: asyncssh.SSHClientConnection | None = None
        self._passwords_given = 0
        self._kbdint_rounds = 0
        self._kbdint_questions = 0
        self.started = False  # the server asked for authentication
        self._accepted: dict[str, None] = {}  # ordered set
        self.unanswered: str | None = None
        self.password_sent = False
        self.tried: dict[str, str] = {}  # method -> what happened, in the order tried

    def connection_made(self, connection: asyncssh.SSHClientConnection) -> None:
        self._connection = connection

    def _requested(self) -> None:
        """Each method's callback: the server is asking for authentication; note what it accepts."""
        self.started = True
        if self._connection is not None:
            self._accepted.update(dict.fromkeys(m for m in self._connection.get_server_auth_methods() if m != "none"))

    def server_methods(self) -> list[str]:
        """The methods the server said it accepts (those this client supports)."""
        return list(self._accepted)

    def public_key_auth_requested(self) -> None:
        self._requested()
        return None  # the configured keys and the agent are offered before this is asked

    async def _ask(self, prompt: str, *, secret: bool, what: str) -> str | None:
        try:
            return await anyio.to_thread.run_sync(functools.partial(self._prompter.ask, prompt, secret=secret))
        except NoTerminal:
            self.unanswered = what
            return None

    async def password_auth_requested(self) -> str | None:
        self._requested()
        self._passwords_given += 1
        configured = self._target.cluster.password
        if configured is not None:
            self.tried["password"] = "the password in the configuration, refused"
            self.password_sent = True
            return configured if self._passwords_given == 1 else None
        if self._passwords_given > self.MAX_PROMPTED_ATTEMPTS:
            return None
        answer = await self._ask(f"[{self._target.cluster.name}] Password for "
                                 f"{self._target.username}@{self._target.hostname}: ",
                                 secret=True, what="a password")
        self.tried["password"] = ("not attempted: no terminal to ask for it" if answer is None else
                                  f"typed {self._passwords_given} time(s), refused")
        return answer

    def kbdint_auth_requested(self) -> str | None:
        self._requested()
        if self._target.cluster.password is None and not self._prompter.can_ask():
            self.tried["keyboard-interactive"] = "not attempted: no terminal to answer it on"
            return None
        if self._kbdint_rounds and not self._kbdint_questions:
            return None  # the server failed it without asking anything: it will again
        if self._kbdint_rounds >= self.MAX_PROMPTED_ATTEMPTS:
            return None
        self._kbdint_rounds += 1
        self.tried["keyboard-interactive"] = "the server ended it without asking anything"
        return ""  # let the server choose its challenge

    async def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                        prompts) -> list[str] | None:
        if not prompts:
            return []
        self._kbdint_questions += len(prompts)
        configured = self._target.cluster.password
        if configured is not None and len(prompts) == 1 and "password" in prompts[0][0].lower():
            # A server that takes its password through keyboard-interactive.
            self._passwords_given += 1
            self.tried["keyboard-interactive"] = "the password in the configuration, refused"
            self.password_sent = True
            return [configured] if self._passwords_given == 1 else None
        header = "\n".join(part for part in (name, instructions) if part)
        answers = []
        for index, (prompt, echo) in enumerate(prompts):
            text = f"{header}\n{prompt}" if header and index == 0 else prompt
            answer = await self._ask(f"[{self._target.cluster.name}] {text}", secret=not echo,
                                     what="answers to the server's keyboard-interactive prompts "
                                          "(such as a two-factor code)")
            if answer is None:
                self.tried["keyboard-interactive"] = "not answered: no terminal to answer it on"
                return None
            answers.append(answer)
        self.tried["keyboard-interactive"] = f"answered {self._kbdint_rounds} time(s), refused"
        return answers

    def attempts(self) -> list[str]:
        """What was offered to the server, for the error message."""
        keys = self._target.identity_files or tuple(
            str(path) for path in sorted(Path("~/.ssh").expanduser().glob("id_*")) if path.suffix != ".pub")
        agent = ["ssh-agent"] if os.environ.get("SSH_AUTH_SOCK") else []
        unusable = {problem.path for problem in self.identities.problems()}
        offered = [*(f"the key {path}" for path in keys if path not in unusable), *agent]
        described = [f"the key {path} (not offered: it cannot be used)" for path in keys if path in unusable]
        if offered:
            described.append(f"{' and '.join(offered)} (refused)")
        described += [f"{method} ({outcome})" for method, outcome in self.tried.items()]
        if self._target.cluster.password is not None and not self.password_sent:
            described.append("the password in the configuration (not sent: the server asked for no password)")
        return described or ["no key, agent or password to offer"]


async def _connect_verified(target: SSHTarget, options: dict, prompter: Prompter, timeout: float,
                            tunnel: asyncssh.SSHClientConnection | None) -> asyncssh.SSHClientConnection:
    """Connect to ``target`` with its host key checked against the trusted
    files; under the opt-in accept-new policy, an unknown host's key is
    recorded first. Never ``known_hosts=None``, which turns checking off."""
    cluster = target.cluster
    trusted = target.trusted_files()
    if not trusted and cluster.host_key_policy != "accept-new":
        raise await _host_key_error(target, tunnel, timeout, changed=False)
    try:
        return await _connect(target, options, prompter, trusted, tunnel)
    except HostKeyError as exc:
        if exc.changed or cluster.host_key_policy != "accept-new":
            raise await _host_key_error(target, tunnel, timeout, changed=exc.changed) from exc
    key = await _server_host_key(target, tunnel, timeout)
    if key is None:
        raise HostKeyError(cluster.name, target.hostname, target.port,
                           str(cluster.project_known_hosts_path), changed=False)
    append_known_host(cluster.project_known_hosts_path, target.hostname, target.port,
                      key.export_public_key().decode())
    # As OpenSSH says it under StrictHostKeyChecking=accept-new.
    logger.warning("cluster %r: permanently added '%s' (%s, %s) to the list of known hosts in %s",
                   cluster.name, host_pattern(target.hostname, target.port), key.get_algorithm(),
                   key.get_fingerprint(), cluster.project_known_hosts_path)
    return await _connect(target, options, prompter, target.trusted_files(), tunnel)


async def _server_host_key(target: SSHTarget, tunnel: asyncssh.SSHClientConnection | None,
                           timeout: float) -> asyncssh.SSHKey | None:
    with _translate_errors(target, connecting=True):
        return await asyncio.wait_for(
            asyncssh.get_server_host_key(target.host, target.port, tunnel=tunnel,
                                         config=list(target.ssh_config) or None), timeout)


async def _host_key_error(target: SSHTarget, tunnel: asyncssh.SSHClientConnection | None, timeout: float, *,
                          changed: bool) -> HostKeyError:
    """The refusal, with the key the server offers, as ssh shows it: what to compare with the admins' list."""
    try:
        key = await _server_host_key(target, tunnel, timeout)
    except RemoteError:
        key = None
    return HostKeyError(target.cluster.name, target.hostname, target.port, str(target.known_hosts[0]),
                        changed=changed, offered=f"{key.get_algorithm()} key {key.get_fingerprint()}" if key else None)


async def _connect(target: SSHTarget, options: dict, prompter: Prompter, trusted: list[Path],
                   tunnel: asyncssh.SSHClientConnection | None) -> asyncssh.SSHClientConnection:
    identities = _Identities(target, prompter)
    # In a thread: a key's passphrase may be asked at the terminal, and its
    # KDF takes a while; other clusters connect meanwhile.
    client_keys = await anyio.to_thread.run_sync(identities.load)
    client = _AuthClient(target, prompter, identities)
    with _translate_errors(target, connecting=True, auth=client):
        return await asyncssh.connect(
            target.host, target.port, username=target.username, tunnel=tunnel,
            config=list(target.ssh_config) or None,
            client_keys=client_keys,
            agent_identities=identities.public_keys() or (),
            # For the default keys (~/.ssh/id_*), which asyncssh loads itself.
            passphrase=identities.passphrase,
            # Empty lists of trusted keys, never None: None turns checking off.
            known_hosts=[str(p) for p in trusted] if trusted else ([], [], []),
            client_factory=lambda: client, **options)


def _authentication_error(target: SSHTarget, auth: _AuthClient | None, cut_off: bool = False) -> AuthenticationError:
    return AuthenticationError(
        target.cluster.name, target.username, target.hostname, target.port,
        tried=auth.attempts() if auth else [], accepted=auth.server_methods() if auth else [],
        unanswered=auth.unanswered if auth else None, key_files=target.identity_files,
        key_problems=auth.identities.problems() if auth else [],
        unsent_password=auth is not None and target.cluster.password is not None and not auth.password_sent,
        cut_off=cut_off, known_hosts=str(target.cluster.known_hosts) if target.cluster.known_hosts else None)


def _host_is_known(target: SSHTarget) -> bool:
    """Whether a trusted file has any key for the host: then a refusal means
    the key *changed*, which deserves a louder message than an unknown one."""
    for path in target.trusted_files():
        try:
            known, *_ = asyncssh.read_known_hosts(str(path)).match(target.hostname, "", target.port)
        except (OSError, ValueError, asyncssh.Error):
            continue
        if known:
            return True
    return False


@contextlib.contextmanager
def _translate_errors(target: SSHTarget, *, connecting: bool = False,
                      name: str | None = None, remote_dir: str | None = None,
                      auth: _AuthClient | None = None) -> Iterator[None]:
    """The one place where asyncssh and socket errors become ours."""
    cluster = target.cluster
    try:
        yield
    except RemoteError:
        raise
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyError(cluster.name, target.hostname, target.port, str(target.known_hosts[0]),
                           changed=_host_is_known(target)) from exc
    except asyncssh.PermissionDenied as exc:
        raise _authentication_error(target, auth) from exc
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
        hint = "" if cluster.passphrase else "; set its passphrase, load it into ssh-agent, or run in a terminal"
        raise ConfigError(cluster.source, f"cluster {cluster.name!r}: the key "
                                          f"{', '.join(target.identity_files)} cannot be used "
                                          f"({exc}{hint}).") from exc
    except asyncssh.SFTPNoSuchFile as exc:
        if name is None:
            raise RemoteDirectoryError(cluster.name, remote_dir or cluster.remote_dir,
                                       "no such directory") from exc
        raise TransferError(cluster.name, name, "the file disappeared from the server") from exc
    except asyncssh.SFTPPermissionDenied as exc:
        if name is None:
            raise RemoteDirectoryError(cluster.name, remote_dir or cluster.remote_dir,
                                       "permission denied") from exc
        raise TransferError(cluster.name, name, "permission denied") from exc
    except (asyncssh.SFTPNoConnection, asyncssh.SFTPConnectionLost) as exc:
        raise ConnectionDroppedError(cluster.name, name or cluster.remote_dir,
                                     f"connection lost ({exc.reason or exc})") from exc
    except asyncssh.SFTPError as exc:
        if remote_dir is not None:
            raise RemoteDirectoryError(cluster.name, remote_dir, exc.reason or str(exc)) from exc
        raise TransferError(cluster.name, name or cluster.remote_dir,
                            f"the server reported: {exc.reason or exc}") from exc
    except (asyncssh.DisconnectError, asyncssh.ChannelOpenError) as exc:
        if connecting and auth is not None and "authentication" in (getattr(exc, "reason", "") or "").lower():
            # "Too many authentication failures": the server's MaxAuthTries
            # ran out (many agent keys, say). A login problem, not a network one.
            raise _authentication_error(target, auth, cut_off=True) from exc
        if connecting:
            raise ConnectError(cluster.name, target.hostname, target.port,
                               _disconnect_words(exc, connecting=True)) from exc
        raise ConnectionDroppedError(cluster.name, name or cluster.remote_dir,
                                     f"connection lost ({_disconnect_words(exc)})") from exc
    except (asyncio.TimeoutError, TimeoutError) as exc:
        if connecting:
            raise ConnectError(cluster.name, target.hostname, target.port,
                               f"timed out: no answer from {target.hostname}:{target.port} in time") from exc
        raise TransferError(cluster.name, name or cluster.remote_dir, "timed out") from exc
    except socket.gaierror as exc:
        if not connecting:
            raise TransferError(cluster.name, name or cluster.remote_dir, "name lookup failed") from exc
        raise ConnectError(cluster.name, target.hostname, target.port, _lookup_words(exc, target.hostname),
                           transient=exc.errno == socket.EAI_AGAIN) from exc
    except OSError as exc:
        if connecting:
            raise ConnectError(cluster.name, target.hostname, target.port,
                               _os_error_words(exc, target.hostname, target.port)) from exc
        raise ConnectionDroppedError(cluster.name, name or cluster.remote_dir,
                                     f"connection lost ({_os_error_words(exc, target.hostname, target.port)})") from exc


# A socket's OSError in plain words, instead of asyncio's "Connect call failed ('10.0.0.7', 22)"
# or a bare "Broken pipe". {host} and {port} are filled in.
_SOCKET_ERRORS = {
    errno.ECONNREFUSED: "connection refused: nothing listens on {host}:{port}",
    errno.ECONNRESET: "connection reset by the server",
    errno.EPIPE: "broken pipe: the other end closed the connection while data was being sent",
    errno.ECONNABORTED: "the connection was aborted",
    errno.ETIMEDOUT: "timed out: no answer from {host}:{port}",
    errno.EHOSTUNREACH: "no route to host {host}",
    errno.ENETUNREACH: "network unreachable: no route to {host} from this machine",
    errno.EHOSTDOWN: "the host {host} is down",
    errno.ENETDOWN: "the network of this machine is down",
    errno.EADDRNOTAVAIL: "the address {host} cannot be used from this machine",
}


def _os_error_words(exc: OSError, host: str, port: int) -> str:
    number = exc.errno
    if number is None:
        # asyncio, having tried each address of the host: "Multiple exceptions:
        # [Errno 111] Connect call failed ('::1', 22, 0, 0), [Errno 111] ...".
        found = re.search(r"\[Errno (\d+)\]", str(exc))
        number = int(found.group(1)) if found else None
    if number in _SOCKET_ERRORS:
        return _SOCKET_ERRORS[number].format(host=host, port=port)
    if number:
        text = os.strerror(number)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def _lookup_words(exc: socket.gaierror, host: str) -> str:
    if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
        return f"name not known: no address found for {host}"
    if exc.errno == socket.EAI_AGAIN:
        return f"the name {host} could not be looked up just now (temporary failure in name resolution)"
    return f"the name {host} could not be looked up ({exc.strerror or exc})"


def _disconnect_words(exc: asyncssh.Error, connecting: bool = False) -> str:
    reason = getattr(exc, "reason", "") or str(exc)
    if isinstance(exc, asyncssh.ConnectionLost) and reason == "Connection lost":  # an end of file, no message
        return "the connection was closed from the other end" + (" during the SSH handshake" if connecting else "")
    return f"the server closed the connection: {reason}" if connecting else reason
