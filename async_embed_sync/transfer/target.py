"""Where a cluster is and as whom to log in, resolved as ``ssh`` resolves it.

The cluster's own fields win; what they leave out comes from the OpenSSH
client config (``ssh_config``, else ``~/.ssh/config``), then from ssh's
defaults. ProxyJump hops are targets of their own.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_KNOWN_HOSTS, ClusterConfig
from .ssh import load_ssh_config

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")


@dataclass(frozen=True)
class SSHTarget:
    """Where to connect and as whom, once the OpenSSH client config had its say."""

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
    ssh = load_ssh_config(cluster, paths, _local_username())
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


def _expand(path: str) -> Path:
    return Path(path).expanduser()


def _local_username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a bare container
        return "root"
