"""The real OpenSSH sshd on loopback, for the tests and the benchmarks.

Runs as root without systemd: keys come from ``ssh-keygen``, the config lives in
``workdir``, and ``sshd -D -e`` stays in the foreground so that it is ours to
stop. Its log goes to ``workdir/sshd.log``.

::

    with OpenSSHServer(workdir) as sshd:
        entry = sshd.cluster_entry("/data/run1")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from async_embed_sync.testing.embedded_server import LoopbackSSHAccess

SSHD = Path("/usr/sbin/sshd")
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
START_ATTEMPTS = 3  # a free port found by bind-and-close can be taken before sshd binds it


def sshd_available() -> bool:
    return SSHD.is_file() and os.access(SSHD, os.X_OK) and shutil.which("ssh-keygen") is not None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def keygen(path: Path, passphrase: str = "") -> None:
    """An ed25519 key pair at ``path`` (+ ``.pub``), as ``ssh-keygen`` writes it: OpenSSH format,
    encrypted with bcrypt's KDF when there is a passphrase."""
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", path.name, "-f", str(path)],
                       check=True, timeout=30, stdin=subprocess.DEVNULL)
    os.chmod(path, 0o600)


@contextlib.contextmanager
def ssh_agent(directory: Path, keys: list[Path]) -> Iterator[str]:
    """A real ssh-agent holding ``keys``; yields its socket, for ``SSH_AUTH_SOCK``."""
    socket_path = directory / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if socket_path.exists():
                break
            time.sleep(0.05)
        for key in keys:
            subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, "SSH_AUTH_SOCK": str(socket_path)},
                           check=True, stdin=subprocess.DEVNULL, capture_output=True)
        yield str(socket_path)
    finally:
        agent.terminate()
        agent.wait(10)


class OpenSSHServer(LoopbackSSHAccess):
    """``/usr/sbin/sshd`` on 127.0.0.1 at a free port, accepting one client key for root.

    ``sftp=False`` leaves the sftp Subsystem out (a server that refuses SFTP);
    ``extra_config`` adds or overrides sshd_config keywords.
    """

    def __init__(self, workdir: Path, *, sftp: bool = True,
                 extra_config: dict[str, str] | None = None, host: str = "127.0.0.1"):
        self.workdir = Path(workdir).resolve()
        self.host = host
        self.port = 0
        self.username = "root"
        self.sftp = sftp
        self.extra_config = dict(extra_config or {})
        self.client_key_path = self.workdir / "client_key"
        self.host_key_path = self.workdir / "host_key"
        self.config_path = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self.host_public_key = ""
        self._process: subprocess.Popen[bytes] | None = None

    def local_path(self, remote_path: str) -> Path | None:
        """The same path: the server is this machine (only under the temp dir, where tests write)."""
        path = Path(remote_path)
        temp = Path(tempfile.gettempdir())
        return path if path.is_relative_to(temp) and path != temp else None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if not sshd_available():
            raise RuntimeError(f"{SSHD} or ssh-keygen is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
        keygen(self.host_key_path)
        keygen(self.client_key_path)
        self.host_public_key = self.host_key_path.with_suffix(".pub").read_text()
        authorized_keys = self.authorized_keys_path
        authorized_keys.write_text(self.client_key_path.with_suffix(".pub").read_text())
        for attempt in range(START_ATTEMPTS):
            self.port = _free_port(self.host)
            self.config_path.write_text(self._config_text(authorized_keys))
            if self._launch():
                self.known_hosts_for(self.port)
                return
        raise RuntimeError(f"sshd did not start after {START_ATTEMPTS} attempts; see {self.log_path}:\n"
                           + self.log_path.read_text()[-2000:])

    @property
    def authorized_keys_path(self) -> Path:
        return self.workdir / "authorized_keys"

    def authorize(self, public_key_path: Path) -> None:
        """Accept one more client key (sshd reads the file at every login)."""
        with self.authorized_keys_path.open("a") as keys:
            keys.write(Path(public_key_path).read_text())

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)
        self._process = None

    def _config_text(self, authorized_keys: Path) -> str:
        settings = {
            "ListenAddress": self.host,
            "Port": str(self.port),
            "HostKey": str(self.host_key_path),
            "PidFile": str(self.workdir / "sshd.pid"),
            "AuthorizedKeysFile": str(authorized_keys),
            "StrictModes": "no",
            "UsePAM": "no",
            "PermitRootLogin": "prohibit-password",
            "PasswordAuthentication": "no",
            "KbdInteractiveAuthentication": "no",
            # Concurrency tests open many channels and connections at once.
            "MaxSessions": "64",
            "MaxStartups": "64:30:128",
        }
        if self.sftp:
            settings["Subsystem"] = "sftp internal-sftp"
        settings.update(self.extra_config)
        return "".join(f"{keyword} {value}\n" for keyword, value in settings.items())

    def _launch(self) -> bool:
        """Start sshd; True once its port accepts, False if it exited first (port taken)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config_path)],
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        return False
