"""Where a cluster is and as whom to log in, resolved as ``ssh`` resolves it.

The cluster's own fields win; what they leave out comes from the OpenSSH
client config (``ssh_config``, else ``~/.ssh/config``), then from ssh's
defaults. ProxyJump hops are targets of their own.

OpenSSH reads the config itself: ``ssh -G HOST`` prints every setting ssh
would use for HOST (``Host`` patterns, ``Match``, ``Include`` and tokens
applied), defaults included, so a second ``ssh -G`` with no config at all
says which values are only defaults, and only the others are taken. Both
run side by side, each a fork and exec of about 5 ms; an ``IdentityFile``
with ``~``, ``%`` or ``${VAR}`` in it costs one more (see
``_expanded_identities``). Without an ``ssh`` command the config is not
read: a warning says so, and a config named in the cluster's
``ssh_config`` is a configuration error instead (see ``_not_read``).
"""

from __future__ import annotations

import dataclasses
import getpass
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import DEFAULT_KNOWN_HOSTS, ClusterConfig
from ..errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_SSH_CONFIG = Path("~/.ssh/config")
# ``Match exec`` runs the user's own commands: they get this long.
SSH_G_TIMEOUT = 60.0
# What is taken from ``ssh -G``, by the lowercase names it prints.
TAKEN = ("hostname", "port", "user", "identityfile", "userknownhostsfile", "proxyjump")

_warned_not_read: set[str] = set()  # configs already warned about: once per process, not per connect


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
    ssh_config: tuple[str, ...]  # the config read (and given to asyncssh); empty if none was
    ssh_command: str = "ssh"  # the OpenSSH client that reads it

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
        return resolve_target(hop_cluster, ssh_command=self.ssh_command)


def resolve_target(cluster: ClusterConfig, *, ssh_command: str = "ssh") -> SSHTarget:
    """``ssh_command``: the OpenSSH client that reads the config (a path, or a name on PATH)."""
    default = DEFAULT_SSH_CONFIG.expanduser()
    path = str(_expand(cluster.ssh_config)) if cluster.ssh_config else (
        str(default) if os.access(default, os.R_OK) else None)
    ssh = _config_settings(cluster, path, ssh_command) if path else None
    if ssh is None:  # no config, or none that can be read here
        path, ssh = None, {}
    # `none` for a file: none of the config's, ssh's defaults then (asyncssh's, for keys).
    known_hosts = [cluster.known_hosts] if cluster.known_hosts else (
        # ssh -G prints them on one line, expanded: a path with a space in it is cut.
        [p for p in " ".join(ssh.get("userknownhostsfile", [])).split() if p != "none"] or [DEFAULT_KNOWN_HOSTS])
    identity = [cluster.key_file] if cluster.key_file else [p for p in ssh.get("identityfile", []) if p != "none"]
    jump = cluster.proxy_jump if cluster.proxy_jump is not None else _one(ssh, "proxyjump")
    return SSHTarget(
        cluster=cluster,
        host=cluster.host,
        hostname=_one(ssh, "hostname") or cluster.host,
        port=cluster.port or int(_one(ssh, "port") or 22),
        username=cluster.username or _one(ssh, "user") or _local_username(),
        identity_files=tuple(str(_expand(p)) for p in identity),
        known_hosts=tuple(_expand(p) for p in known_hosts),
        proxy_jump=tuple(h.strip() for h in (jump or "").split(",") if h.strip() and h.strip() != "none"),
        ssh_config=(path,) if path else (),
        ssh_command=ssh_command,
    )


def _config_settings(cluster: ClusterConfig, path: str, ssh_command: str) -> dict[str, list[str]] | None:
    """The settings of ``TAKEN`` that the config at ``path`` gives the cluster's
    host, as ``ssh -G`` prints them; None where there is no ``ssh`` to ask.

    A value the config sets to exactly ssh's default is taken for a default,
    which changes nothing but in two corners: ``User`` set to the local
    user (``_local_username`` asks ``$USER`` first, ssh the password
    database), and ``UserKnownHostsFile`` set to ssh's two defaults (only
    ``~/.ssh/known_hosts`` is read).
    """
    try:
        given, defaults = _ssh_g(cluster, path, ssh_command, [path, os.devnull])
    except OSError as exc:  # no such command, or not one that runs
        _not_read(cluster, path, f"the OpenSSH client `{ssh_command}` cannot be run ({exc.strerror or exc})")
        return None
    settings = {name: given[name] for name in TAKEN if name in given and given[name] != defaults.get(name)}
    if "identityfile" in settings:
        settings["identityfile"] = _expanded_identities(cluster, path, ssh_command, settings["identityfile"])
    return settings


def _expanded_identities(cluster: ClusterConfig, path: str, ssh_command: str, files: list[str]) -> list[str]:
    """``IdentityFile`` values with ``~``, ``%`` tokens and ``${VAR}`` expanded, by ssh itself.

    ``ssh -G`` prints them as written (ssh expands them only as it loads the
    keys, after ``-G`` has exited). ``UserKnownHostsFile`` goes through the
    same expansion before ``-G`` prints, so each is handed back to ssh as a
    ``UserKnownHostsFile`` (one per run: ssh prints several on one line,
    joined by spaces that a path may hold too).
    """
    todo = [value for value in files if any(c in value for c in "~%$")]
    runs = _ssh_g(cluster, path, ssh_command, [path] * len(todo),
                  [["-o", f"UserKnownHostsFile={_quoted(value)}"] for value in todo])
    expanded = {value: " ".join(run["userknownhostsfile"]) for value, run in zip(todo, runs)}
    return [expanded.get(value, value) for value in files]


def _ssh_g(cluster: ClusterConfig, path: str, ssh_command: str, configs: list[str],
           options: list[list[str]] | None = None) -> list[dict[str, list[str]]]:
    """``ssh -G`` for the cluster's host, once per config in ``configs``
    (with the matching ``options``), all at once; each one's settings.
    ``-p`` and ``-l`` are the cluster's own, as ``Match`` must see them."""
    commands = [[ssh_command, "-G", "-T", "-F", config,
                 *(["-p", str(cluster.port)] if cluster.port else []),
                 *(["-l", cluster.username] if cluster.username else []),
                 *extra, "--", cluster.host]
                for config, extra in zip(configs, options or [[]] * len(configs))]
    processes: list[subprocess.Popen] = []
    try:
        for command in commands:
            processes.append(subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                encoding=sys.getfilesystemencoding(), errors="surrogateescape"))
        outputs = [process.communicate(timeout=SSH_G_TIMEOUT) for process in processes]
    except subprocess.TimeoutExpired:
        raise ConfigError(cluster.source, f"cluster {cluster.name!r}: the ssh config {path} cannot be read "
                                          f"(`ssh -G` gave no answer in {SSH_G_TIMEOUT:.0f} s: does a "
                                          "`Match exec` command hang?).") from None
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                process.communicate()
    settings = []
    for process, (out, err) in zip(processes, outputs):
        if process.returncode != 0:
            said = "; ".join(line.strip() for line in err.splitlines() if line.strip())
            raise ConfigError(cluster.source, f"cluster {cluster.name!r}: the ssh config {path} cannot be read "
                                              f"({said or f'`ssh -G` exited with status {process.returncode}'}).")
        parsed: dict[str, list[str]] = {}
        for line in out.splitlines():
            name, _, value = line.partition(" ")
            parsed.setdefault(name, []).append(value)
        settings.append(parsed)
    return settings


def _not_read(cluster: ClusterConfig, path: str, why: str) -> None:
    """No ``ssh`` to read the config with (a container with Python and no
    OpenSSH client): a config the cluster names is a configuration error;
    the implicit ``~/.ssh/config`` is left out, with a warning, and is not
    given to asyncssh either, so that none of it applies rather than a part.

    asyncssh's public API applies a config only inside ``connect``, and
    says nothing of the host, port, user or jump hosts it resolved: no
    public fallback gives what ``ssh -G`` does.
    """
    fix = "install the OpenSSH client, or set the cluster's host, port, username, key_file and proxy_jump"
    if cluster.ssh_config:
        raise ConfigError(cluster.source, f"cluster {cluster.name!r}: the ssh config {path} cannot be read: "
                                          f"{why}, and it is what reads it; {fix} and remove `ssh_config`.")
    if path not in _warned_not_read:
        _warned_not_read.add(path)
        logger.warning("cluster %r: %s, so the ssh config %s is not read (%s)", cluster.name, why, path, fix)


def _quoted(value: str) -> str:
    """One argument of an ssh config line, as ssh splits them."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _one(settings: dict[str, list[str]], name: str) -> str | None:
    return settings[name][0] if name in settings else None


def _expand(path: str) -> Path:
    return Path(path).expanduser()


def _local_username() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no $USER: a bare container
        return "root"
