"""The SSH client: the one module that imports asyncssh.

A ``Connection`` is reached as ``ssh`` would reach it (the ``SSHTarget`` of
``target.py``, through its ProxyJump hops), with the host key always
verified, and logged in with the configured keys, the agent, passwords and
keyboard-interactive answers (``prompts.Prompter`` asks what the
configuration does not say). ``translate_errors`` is the one place where
asyncssh's and the socket's errors become ours; nothing above this module
sees an asyncssh type. The file-access modules (``sftp_files.py``,
``shell.py``, ``hashes.py``) take the connection's objects and the few
asyncssh names they need from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from ..dependencies import import_asyncssh
from ..errors import (
    AsyncEmbedSyncError,
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectionDroppedError,
    HandshakeDroppedError,
    HostKeyError,
    KeyProblem,
    RemoteDirectoryError,
    RemoteError,
    RemoteFileDeniedError,
    RemoteFileGoneError,
    TransferError,
)
from ..known_hosts import append_known_host, host_pattern
from .files import remote_path
from .prompts import NoTerminal, Prompter, Questions, Withdrawn

if TYPE_CHECKING:
    from .target import SSHTarget

asyncssh = import_asyncssh()

logger = logging.getLogger(__name__)

# AES-GCM first: with AES-NI, decrypting it costs far less CPU than asyncssh's
# default first choice, chacha20-poly1305 (1.08 GB over loopback: 8.9 s ->
# 7.7 s). The rest of asyncssh's defaults follow, for servers without it.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
                     "chacha20-poly1305@openssh.com", "aes256-ctr", "aes192-ctr", "aes128-ctr")
# How long a close waits for the connection to end, and then for the reads
# given up on it: after an abort, no time at all.
CLOSE_TIMEOUT = 5.0

# ------------------------------------------------ names the file-access modules use

ChannelOpenError = asyncssh.ChannelOpenError  # the server refuses a channel (a session, a subsystem)
SFTPError = asyncssh.SFTPError
FILE_TYPE_SYMLINK = asyncssh.FILEXFER_TYPE_SYMLINK
# What a directory entry's type says of a regular file (UNKNOWN: a server that does not say).
REGULAR_FILE_TYPES = (asyncssh.FILEXFER_TYPE_REGULAR, asyncssh.FILEXFER_TYPE_UNKNOWN)


def closed_connection_error() -> Exception:
    """What a request still waiting at close learns (``translate_errors`` words it)."""
    return asyncssh.ConnectionLost("the connection was closed")


# ------------------------------------------------------------------ connect


class Connection:
    """One authenticated SSH connection (``client``: asyncssh's, for the
    file-access modules to use) and the jump hosts it runs through."""

    def __init__(self, client: asyncssh.SSHClientConnection, jumps: list[asyncssh.SSHClientConnection]):
        self.client = client
        self._jumps = jumps

    @classmethod
    async def open(cls, target: SSHTarget, *, timeout: float, window: int, prompter: Prompter) -> Connection:
        """Connect through each ProxyJump hop, then to ``target``; host keys are always verified.

        ``timeout`` bounds the connect and login, and (through keepalives)
        how long a silently dead link goes unnoticed.
        """
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
                # `ssh -G` (10-30 ms) in a worker thread: the other clusters' transfers go on meanwhile.
                hop = await anyio.to_thread.run_sync(target.hop, spec)
                tunnel = await _connect_verified(hop, options, prompter, timeout, tunnel)
                jumps.append(tunnel)
            return cls(await _connect_verified(target, options, prompter, timeout, tunnel), jumps)
        except BaseException:
            for jump in reversed(jumps):
                jump.abort()
            raise

    @property
    def is_closed(self) -> bool:
        return self.client.is_closed()

    async def close(self, *, abort: bool = False) -> None:
        """Close (``abort``: drop, for a stalled link would never flush a polite close) and wait for the end."""
        if abort:
            self.client.abort()
        else:
            self.client.close()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            with contextlib.suppress(Exception):
                await self.client.wait_closed()

    def close_jumps(self) -> None:
        for jump in reversed(self._jumps):
            jump.close()


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
    with translate_errors(target, connecting=True):
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
    # The attempt's questions (passphrases, passwords, 2FA codes) end with
    # it, however it ends: none is left waiting at the terminal.
    with Questions(prompter) as questions:
        identities = _Identities(target, questions)
        # In a thread: a key's passphrase may be asked at the terminal, and its
        # KDF takes a while; other clusters connect meanwhile.
        client_keys = await questions.run_sync(identities.load)
        client = _AuthClient(target, questions, identities)
        with translate_errors(target, connecting=True, auth=client):
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


# ------------------------------------------------------------------ log in


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

    def __init__(self, target: SSHTarget, questions: Questions):
        self._target = target
        self._questions = questions
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
        if answer is None and not _opens(filename):  # encrypted, or no key at all
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
                answer = self._questions.ask(prompt)  # on a worker thread: the load's, or asyncssh's
            except (NoTerminal, Withdrawn):
                return None
            if not answer or _opens(filename, answer):
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
        if _opens(path, given) is False:  # only after a failure: the KDF is slow on purpose
            if self._target.cluster.passphrase is not None:
                return KeyProblem(path, "it is encrypted, and the configured `passphrase` does not decrypt it",
                                  f"correct `passphrase` for this cluster, or {agent}")
            return KeyProblem(path, "it is encrypted, and the passphrase typed does not decrypt it",
                              f"run the command again and type the key's passphrase, or {agent}")
        return None


def _unreadable_default_keys() -> list[str]:
    """The ``~/.ssh/id_*`` files that asyncssh, loading the default keys itself, cannot read as keys."""
    folder = Path("~/.ssh").expanduser()
    candidates = sorted(folder.glob("id_*")) if folder.is_dir() else []
    return [str(path) for path in candidates
            if path.suffix != ".pub" and not path.name.endswith("-cert") and _opens(str(path)) is False]


def _opens(filename: str, passphrase: str | None = None) -> bool | None:
    """Whether the key file opens (with ``passphrase``): False where it is
    encrypted and the passphrase is missing or wrong, or it is no key asyncssh
    reads; None where the file cannot be read."""
    try:
        asyncssh.read_private_key(filename, passphrase)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError):
        return False
    except OSError:
        return None
    return True


class _AuthClient(asyncssh.SSHClient):
    """Passwords and keyboard-interactive prompts (2FA codes): from the
    configuration, else asked through the prompter. A method nobody can
    answer (no terminal) is not attempted, and one whose attempt the server
    failed without a question is not attempted again: each attempt counts
    against the server's ``MaxAuthTries``, and a client that keeps trying
    is cut off with "Too many authentication failures", which reads like a
    connection problem. What was tried is kept for the error message."""

    MAX_PROMPTED_ATTEMPTS = 3

    def __init__(self, target: SSHTarget, questions: Questions, identities: _Identities):
        self._target = target
        self._questions = questions
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
            return await self._questions.ask_async(prompt, secret=secret)
        except NoTerminal:
            self.unanswered = what
            return None
        except Withdrawn:  # the attempt has ended (a timeout, the server gave up)
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
        if self._target.cluster.password is None and not self._questions.can_ask():
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


# ------------------------------------------------------------ our errors


@contextlib.contextmanager
def translate_errors(target: SSHTarget, *, connecting: bool = False,
                     name: str | None = None, remote_dir: str | None = None,
                     auth: _AuthClient | None = None) -> Iterator[None]:
    """The one place where asyncssh and socket errors become ours.

    ``connecting``: the error ends a connect (a ``ConnectError``), not a
    transfer; ``name``/``remote_dir``: the file or directory at work;
    ``auth``: the login under way, whose attempts the error then lists.
    """
    try:
        yield
    except RemoteError:
        raise
    except (asyncssh.Error, asyncssh.KeyImportError, asyncssh.KeyEncryptionError, asyncssh.ConfigParseError,
            OSError, asyncio.TimeoutError) as exc:
        ours = _translation(exc, target, connecting=connecting, name=name, remote_dir=remote_dir, auth=auth)
        if ours is None:
            raise
        raise ours from exc


def _translation(exc: Exception, target: SSHTarget, *, connecting: bool, name: str | None,
                 remote_dir: str | None, auth: _AuthClient | None) -> AsyncEmbedSyncError | None:
    """Our error for ``exc``; None for one that is not ours to word."""
    cluster = target.cluster
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyError(cluster.name, target.hostname, target.port, str(target.known_hosts[0]),
                            changed=_host_is_known(target))
    if isinstance(exc, asyncssh.PermissionDenied):
        return _authentication_error(target, auth)
    if isinstance(exc, (asyncssh.KeyImportError, asyncssh.KeyEncryptionError)):
        # Reached where asyncssh loads the default keys itself (no key
        # configured, or none loadable) and one of ~/.ssh/id_* is no key it
        # reads: its load_default_keypairs lets KeyImportError through. The
        # configured keys are loaded by _Identities, which says why one fails.
        hint = "" if cluster.passphrase else "; set its passphrase, load it into ssh-agent, or run in a terminal"
        keys = ", ".join(target.identity_files or _unreadable_default_keys()) or "in ~/.ssh"
        return ConfigError(cluster.source, f"cluster {cluster.name!r}: the key {keys} cannot be used "
                                           f"({exc}{hint}).")
    if isinstance(exc, asyncssh.ConfigParseError):
        # A line `ssh -G` takes (target.py) and asyncssh, which applies the
        # rest of the ssh config as it connects, does not (ConnectTimeout 1m).
        return ConfigError(cluster.source, f"cluster {cluster.name!r}: the ssh config "
                                           f"{', '.join(target.ssh_config)} cannot be read by asyncssh ({exc}).")
    if isinstance(exc, asyncssh.SFTPError):
        return _sftp_error(target, exc, name, remote_dir)
    if isinstance(exc, (asyncssh.DisconnectError, asyncssh.ChannelOpenError)):
        return _disconnect_error(target, exc, connecting, name, auth)
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return _network_error(target, exc, connecting, name)
    return None


# An SFTP refusal: its words for remote_dir, then for a file in it.
_SFTP_REFUSALS = {
    asyncssh.SFTPNoSuchFile: ("no such directory", "the file disappeared from the server"),
    asyncssh.SFTPPermissionDenied: ("permission denied", "permission denied"),
}


def _sftp_error(target: SSHTarget, exc: asyncssh.SFTPError, name: str | None,
                remote_dir: str | None) -> RemoteError:
    cluster = target.cluster
    for refusal, (directory_words, file_words) in _SFTP_REFUSALS.items():
        if isinstance(exc, refusal):
            if name is None:
                return RemoteDirectoryError(cluster.name, remote_dir or cluster.remote_dir, directory_words)
            # A listed file the account may not read, or one deleted since the listing:
            # said at once, not retried (a retry meets the same answer).
            if isinstance(exc, asyncssh.SFTPPermissionDenied):
                return RemoteFileDeniedError(cluster.name, name, target.username, remote_path(cluster, name))
            return RemoteFileGoneError(cluster.name, name)
    if isinstance(exc, (asyncssh.SFTPNoConnection, asyncssh.SFTPConnectionLost)):
        return ConnectionDroppedError(cluster.name, name or cluster.remote_dir,
                                      f"connection lost ({exc.reason or exc})")
    if remote_dir is not None:
        return RemoteDirectoryError(cluster.name, remote_dir, exc.reason or str(exc))
    return TransferError(cluster.name, name or cluster.remote_dir, f"the server reported: {exc.reason or exc}")


def _disconnect_error(target: SSHTarget, exc: asyncssh.Error, connecting: bool, name: str | None,
                      auth: _AuthClient | None) -> RemoteError:
    cluster = target.cluster
    if connecting and auth is not None and "authentication" in (getattr(exc, "reason", "") or "").lower():
        # "Too many authentication failures": the server's MaxAuthTries
        # ran out (many agent keys, say). A login problem, not a network one.
        return _authentication_error(target, auth, cut_off=True)
    if connecting and isinstance(exc, asyncssh.ConnectionLost):
        # The host answered, then the connection went: a drop, retried as one.
        return HandshakeDroppedError(cluster.name, target.hostname, target.port,
                                     _disconnect_words(exc, connecting=True))
    if connecting:
        return ConnectError(cluster.name, target.hostname, target.port, _disconnect_words(exc, connecting=True))
    return ConnectionDroppedError(cluster.name, name or cluster.remote_dir,
                                  f"connection lost ({_disconnect_words(exc)})")


def _network_error(target: SSHTarget, exc: OSError | asyncio.TimeoutError, connecting: bool,
                   name: str | None) -> RemoteError:
    cluster, host, port = target.cluster, target.hostname, target.port
    where = name or cluster.remote_dir
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        if connecting:
            return ConnectError(cluster.name, host, port, f"timed out: no answer from {host}:{port} in time")
        return TransferError(cluster.name, where, "timed out")
    if isinstance(exc, socket.gaierror):
        if not connecting:
            return TransferError(cluster.name, where, "name lookup failed")
        return ConnectError(cluster.name, host, port, _lookup_words(exc, host),
                            transient=exc.errno == socket.EAI_AGAIN)
    if connecting:
        return ConnectError(cluster.name, host, port, _os_error_words(exc, host, port))
    return ConnectionDroppedError(cluster.name, where, f"connection lost ({_os_error_words(exc, host, port)})")


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
