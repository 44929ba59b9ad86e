"""An SFTP server inside this process, on loopback, for the demo and the tests.

It is the server side of the tool's protocol, so it may import asyncssh
(``transfer/ssh.py`` stays the only *client* of it). What it offers:

* a fresh ed25519 host key and client key in ``workdir`` (the client key is
  mode 0600, as ssh and the tool's config check demand), and a
  ``known_hosts`` file naming ``[127.0.0.1]:PORT``, so that clients verify the
  host key exactly as they would in production;
* public-key authentication with that client key only, for any user name;
* SFTP chrooted to ``root``, served by ``sftp_factory``: tests pass an
  ``asyncssh.SFTPServer`` subclass to inject faults;
* when ``allow_exec`` is true, the one command the tool runs remotely,
  ``sha256sum [--] PATH...``, answered like coreutils (``<hex>  PATH``, exit 0;
  exit 1 and a message on stderr when the file is missing); any other command
  exits 127. When it is false, exec requests are refused, like a server
  without a shell. Every command received is recorded in ``exec_commands``.

::

    async with EmbeddedSFTPServer(root, workdir) as server:
        entry = server.cluster_entry(remote_dir="/run1")
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shlex
import traceback
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Self

from ..dependencies import import_asyncssh
from ..fileio import file_sha256
from ..known_hosts import known_hosts_line
from .synthetic import finish_writing

asyncssh = import_asyncssh()

CLOSE_TIMEOUT = 5.0
COMMAND_NOT_FOUND = 127


class LoopbackSSHAccess:
    """What a client needs to reach a loopback SSH server, and the config entry for it.

    Shared by this module's server and the OpenSSH launcher of the tests:
    subclasses set ``host``, ``port``, ``workdir``, ``client_key_path``,
    ``host_public_key`` (``"ssh-ed25519 AAAA..."``) and ``username``.
    """

    host: str
    port: int
    workdir: Path
    client_key_path: Path
    host_public_key: str
    username: str

    def local_path(self, remote_path: str) -> Path | None:
        """Where a path as a client names it lives on this machine; None: not known here."""
        return None

    @property
    def known_hosts_path(self) -> Path:
        """The known_hosts file for the server's own port (written when it starts)."""
        return self.workdir / "known_hosts"

    def known_hosts_for(self, port: int) -> Path:
        """Write a known_hosts file that trusts this server's host key at ``port``.

        A proxy in front of the server listens on another port, and ssh looks
        host keys up by port, so each port gets its own file.
        """
        path = self.known_hosts_path if port == self.port else self.workdir / f"known_hosts_{port}"
        path.write_text(known_hosts_line(self.host, port, self.host_public_key))
        return path

    def cluster_entry(self, remote_dir: str = "/", *, port: int | None = None,
                      **overrides: Any) -> dict[str, Any]:
        """The ``credentials.json`` entry for this server (through ``port`` if given).

        The files already under ``remote_dir`` are made to look as a finished
        run leaves them (``finish_writing``): a test that wants a file still
        being written writes it after this call."""
        port = self.port if port is None else port
        finish_writing(self.local_path(remote_dir))
        entry: dict[str, Any] = {
            "host": self.host,
            "port": port,
            "username": self.username,
            "key_file": str(self.client_key_path),
            "remote_dir": remote_dir,
            "known_hosts": str(self.known_hosts_for(port)),
        }
        entry.update(overrides)
        return entry


def _write_private_key(key: asyncssh.SSHKey, path: Path) -> None:
    # Created 0600 from the start: a key must never exist with wider bits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.export_private_key())
    os.chmod(path, 0o600)
    path.with_suffix(".pub").write_bytes(key.export_public_key())


def _coreutils_line(digest: str, name: str) -> str:
    # coreutils escapes names holding a backslash or newline and flags the
    # line with a leading backslash.
    if "\\" in name or "\n" in name:
        return "\\" + digest + "  " + name.replace("\\", "\\\\").replace("\n", "\\n") + "\n"
    return f"{digest}  {name}\n"


class _ConnectionTracker(asyncssh.SSHServer):
    def __init__(self, server: EmbeddedSFTPServer):
        self._server = server
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._server.connections += 1
        self._server._open.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._open.discard(self._conn)

    def password_auth_supported(self) -> bool:
        return self._server.password is not None

    def validate_password(self, username: str, password: str) -> bool:
        return password == self._server.password

    def kbdint_auth_supported(self) -> bool:
        return self._server.one_time_code is not None

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str):
        return "Two-factor authentication", "A code from your authenticator app.", "", \
            [("Verification code: ", False)]

    def validate_kbdint_response(self, username: str, responses) -> bool:
        return list(responses) == [self._server.one_time_code]


def _ignore_transports_torn_down_twice(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Have ``loop`` ignore one known error of Python 3.11's asyncio, raised in the server's teardown.

    A client that goes away while the server's writes to it are still
    buffered: asyncio closes the transport at the end of file, asyncssh
    aborts it as well, and if the buffer drains in between, the abort finds
    the transport already torn down (``_force_close``: "'NoneType' object has
    no attribute 'call_soon'"). Nothing is lost (the connection is over
    either way), but the loop reports it, and a test's loop fails the test.
    Anything else goes to the loop's handler as before. Returns the undo.
    """
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        if (isinstance(error, AttributeError) and "call_soon" in str(error) and frames
                and frames[-1].name == "_force_close" and frames[-1].filename.endswith("selector_events.py")):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

    def restore() -> None:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)

    return restore


class EmbeddedSFTPServer(LoopbackSSHAccess):
    """An asyncssh SFTP server on loopback serving ``root``; see the module docstring.

    ``workdir`` receives the keys and known_hosts files; give each server its own.
    """

    def __init__(self, root: Path, workdir: Path, *,
                 sftp_factory: Callable[..., asyncssh.SFTPServer] = asyncssh.SFTPServer,
                 allow_exec: bool = True, host: str = "127.0.0.1", port: int = 0,
                 username: str = "tester", password: str | None = None,
                 one_time_code: str | None = None, accept_client_key: bool = True,
                 sftp: bool = True):
        self.root = Path(root).resolve()
        self.workdir = Path(workdir)
        self.host = host
        self.port = port
        self.username = username
        self.allow_exec = allow_exec
        # Also accepted, when set: password authentication with it, and a
        # keyboard-interactive "Verification code" challenge answered with it.
        self.password = password
        self.one_time_code = one_time_code
        self.accept_client_key = accept_client_key
        # False: no SFTP subsystem at all, as on clusters that switch it off.
        self.sftp = sftp
        self.sftp_factory = sftp_factory
        self.exec_commands: list[str | None] = []
        self.connections = 0
        self._open: set[asyncssh.SSHServerConnection] = set()
        # The commands being answered (asyncssh runs each as a task of its own
        # and does not end them when the connection closes).
        self._commands: set[asyncio.Task] = set()
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._restore_exception_handler: Callable[[], None] = lambda: None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_public_key = self.host_key.export_public_key().decode()
        _write_private_key(self.host_key, self.workdir / "host_key")
        self.client_key_path = self.workdir / "client_key"
        self._client_key = asyncssh.generate_private_key("ssh-ed25519")
        _write_private_key(self._client_key, self.client_key_path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._restore_exception_handler = _ignore_transports_torn_down_twice(asyncio.get_running_loop())
        authorized = asyncssh.import_authorized_keys(self._client_key.export_public_key().decode())
        self._acceptor = await asyncssh.listen(
            self.host, self.port,
            server_factory=functools.partial(_ConnectionTracker, self),
            server_host_keys=[self.host_key],
            # Refusing the key leaves only password or keyboard-interactive.
            authorized_client_keys=authorized if self.accept_client_key else None,
            sftp_factory=functools.partial(self.sftp_factory, chroot=str(self.root)) if self.sftp else None,
            # Without a process factory asyncssh refuses exec requests, which
            # is what a server without a shell does.
            process_factory=self._run_command if self.allow_exec else None,
        )
        self.port = self._acceptor.get_port()
        self.known_hosts_for(self.port)

    async def close(self) -> None:
        if self._acceptor is None:
            return
        self._acceptor.close()
        for conn in list(self._open):
            conn.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._acceptor.wait_closed(), CLOSE_TIMEOUT)
            await asyncio.wait_for(
                asyncio.gather(*(conn.wait_closed() for conn in list(self._open))), CLOSE_TIMEOUT)
        # A command still running (a sha256sum whose client hung up, at a
        # Ctrl-C) would otherwise outlive the server, and asyncio would report
        # it as "Task was destroyed but it is pending!" once its loop is gone.
        for task in list(self._commands):
            task.cancel()
        if self._commands:
            await asyncio.wait(list(self._commands), timeout=CLOSE_TIMEOUT)
        self._acceptor = None
        self._restore_exception_handler()

    def local_path(self, remote_path: str) -> Path | None:
        """Where a path as a client names it lives under ``root``; None if it escapes root."""
        # The SFTP session starts in the chroot's "/", so relative names are
        # taken from there too.
        relative = PurePosixPath("/", remote_path).relative_to("/")
        local = (self.root / relative).resolve()
        return local if local.is_relative_to(self.root) else None

    async def _run_command(self, process: asyncssh.SSHServerProcess) -> None:
        self.exec_commands.append(process.command)
        task = asyncio.current_task()
        self._commands.add(task)
        status = COMMAND_NOT_FOUND
        try:
            status = await self._answer(process.command, process.stdout, process.stderr)
        finally:
            self._commands.discard(task)
            process.exit(status)

    async def _answer(self, command: str | None, stdout: asyncssh.SSHWriter,
                      stderr: asyncssh.SSHWriter) -> int:
        try:
            words = shlex.split(command or "")
        except ValueError:
            words = []
        if words[:1] != ["sha256sum"] or len(words) < 2:
            stderr.write(f"sh: 1: {command!s}: not found\n")
            return COMMAND_NOT_FOUND
        names = words[2:] if words[1] == "--" else words[1:]
        status = 0
        # Like coreutils: one line per file, in order; a missing file is
        # reported on stderr and makes the exit status 1, the rest still hashed.
        for name in names:
            local = self.local_path(name)
            try:
                if local is None:
                    raise FileNotFoundError
                digest = await asyncio.to_thread(file_sha256, local)
            except FileNotFoundError:
                stderr.write(f"sha256sum: {name}: No such file or directory\n")
                status = 1
                continue
            except IsADirectoryError:
                stderr.write(f"sha256sum: {name}: Is a directory\n")
                status = 1
                continue
            stdout.write(_coreutils_line(digest, name))
        return status
