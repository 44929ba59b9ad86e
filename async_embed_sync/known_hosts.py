"""The OpenSSH known_hosts format, as far as this tool writes it."""

from __future__ import annotations

import os
from pathlib import Path


def host_pattern(host: str, port: int) -> str:
    """How ssh names a host in known_hosts: ``[host]:port`` unless port 22."""
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, port: int, public_key: str) -> str:
    return f"{host_pattern(host, port)} {public_key.strip()}\n"


def append_known_host(path: Path, host: str, port: int, public_key: str) -> None:
    """Add one trusted key; the file is created private, as ssh does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(known_hosts_line(host, port, public_key))
        f.flush()
        os.fsync(f.fileno())
