"""Cluster settings: read, validate, check permissions. No network, no writes.

Two layouts are read:

* ``credentials.json`` (the default, in the working directory)::

      {"clusters": {"tensor01": {"host": ..., "port": 22, "username": ...,
                                 "key_file": ... | "password": ...,
                                 "remote_dir": ..., "pattern": ...,
                                 "known_hosts": ...}},
       "total_rows": 250010}

  ``total_rows`` (optional; ``null`` is "not set", as ``init`` writes it):
  the rows of the whole run, articles and others; a run whose checkpoints
  stop short of it does not merge. A field whose name starts with ``_``
  is a comment, ignored (at the top level and in a cluster's entry).
  ``settle_seconds`` (optional, default 60): a file last written less than
  this long before the sync lists it may still be being written, and is
  not put in place yet (``transfer/settle.py``); ``--settle`` overrides it.

* the legacy ``.credentials/`` folder of ``<cluster>.credentials`` JSON files,
  one cluster per file, same fields.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import (
    ConfigError,
    KeyPermissionError,
    LocalFileError,
    NoConfigError,
    UnknownClusterError,
    os_error_problem,
)

logger = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = "credentials.json"
DEFAULT_CREDENTIALS_DIR = ".credentials"
CONFIG_ENV = "ASYNC_EMBED_SYNC_CONFIG"
# A minimal working entry, for the message that says none was found.
MINIMAL_ENTRY = ('{"clusters": {"tensor01": {"host": "tensor01.example.org", '
                 '"remote_dir": "/scratch/you/embeddings/checkpoints"}}}')
# How the message that says none was found names ``init``; the command line puts the name typed instead.
INIT_COMMAND = "python -m async_embed_sync init"
DEFAULT_PATTERNS = ("*.pkl", "*.npy", "*.json", "*.jsonl")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
# Where the opt-in ``accept-new`` policy records keys it saw first: the
# project's own file beside the configuration, never the user's ~/.ssh.
PROJECT_KNOWN_HOSTS = "known_hosts.async_embed_sync"
HOST_KEY_POLICIES = ("strict", "accept-new")

_KNOWN_FIELDS = {
    "host", "port", "username", "key_file", "password", "passphrase",
    "remote_dir", "pattern", "known_hosts", "host_key_policy", "ssh_config", "proxy_jump",
}


@dataclass(frozen=True)
class ClusterConfig:
    """One cluster as the configuration states it.

    A field left out is None: the OpenSSH client config (``ssh_config``, or
    ``~/.ssh/config``) then decides, as it would for ``ssh``, and after it
    ssh's own defaults. ``transfer/target.py``'s ``resolve_target`` does that resolution.
    """

    name: str
    host: str  # a host name, or a Host alias of the ssh config
    remote_dir: str
    port: int | None = None
    username: str | None = None
    key_file: str | None = None
    # repr=False: a config object printed in a log or a traceback must never
    # show the secret.
    password: str | None = field(default=None, repr=False)
    passphrase: str | None = field(default=None, repr=False)
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    known_hosts: str | None = None
    # "strict": an unknown host is refused. "accept-new" (opt-in, like
    # OpenSSH's StrictHostKeyChecking=accept-new): an unknown host's key is
    # recorded in the project's known_hosts and trusted from then on; a
    # changed key is refused either way.
    host_key_policy: str = "strict"
    ssh_config: str | None = None
    # "[user@]host[:port]", or several hops separated by commas, as ssh -J.
    proxy_jump: str | None = None
    source: str = ""

    @property
    def project_known_hosts_path(self) -> Path:
        return Path(self.source or ".").resolve().parent / PROJECT_KNOWN_HOSTS


@dataclass(frozen=True)
class Config:
    clusters: dict[str, ClusterConfig]
    source: str
    warnings: tuple[str, ...] = ()
    total_rows: int | None = None
    settle_seconds: float | None = None

    def select(self, names: list[str] | None) -> list[ClusterConfig]:
        """The clusters named by ``--clusters`` (all when ``names`` is empty).

        Accepts ``["tensor01", "tensor02"]`` and the legacy quoted form
        ``["tensor01 tensor02"]`` alike.
        """
        if not names:
            return list(self.clusters.values())
        wanted = [n for arg in names for n in arg.replace(",", " ").split()]
        unknown = [n for n in wanted if n not in self.clusters]
        if unknown:
            raise UnknownClusterError(self.source, unknown, self.clusters)
        return [self.clusters[n] for n in dict.fromkeys(wanted)]


def user_config_file() -> Path:
    """``credentials.json`` in the user's config directory (``$XDG_CONFIG_HOME``, else ``~/.config``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or "~/.config"
    return Path(base).expanduser() / "async_embed_sync" / DEFAULT_CONFIG_FILE


def load_config(config_file: str | os.PathLike | None = None,
                credentials_dir: str | os.PathLike | None = None, *, required: bool = True) -> Config | None:
    """Read the configuration where people look for it.

    An explicit ``config_file`` or ``credentials_dir`` is used as given (and
    must exist); else the file named by ``$ASYNC_EMBED_SYNC_CONFIG`` (which
    must exist too); else ``./credentials.json``, ``./.credentials/``, then
    the user's ``~/.config/async_embed_sync/credentials.json``. When none is
    there: an error saying where it looked, or None if not ``required``.

    Its warnings (a secret in a file others can read) are logged here, so
    that every command and every library call shows them.
    """
    config = _find_config(config_file, credentials_dir, required=required)
    for warning in config.warnings if config is not None else ():
        logger.warning("%s", warning)
    return config


def _find_config(config_file: str | os.PathLike | None, credentials_dir: str | os.PathLike | None, *,
                 required: bool) -> Config | None:
    if config_file is not None:
        return _load_json_file(Path(config_file))
    if credentials_dir is not None:
        return _load_credentials_dir(Path(credentials_dir))
    if os.environ.get(CONFIG_ENV):
        named = Path(os.environ[CONFIG_ENV]).expanduser()
        if not named.exists():
            raise ConfigError(str(named), f"this file, named by ${CONFIG_ENV}, does not exist.")
        return _load_json_file(named)
    if Path(DEFAULT_CONFIG_FILE).is_file():
        return _load_json_file(Path(DEFAULT_CONFIG_FILE))
    if Path(DEFAULT_CREDENTIALS_DIR).is_dir():
        return _load_credentials_dir(Path(DEFAULT_CREDENTIALS_DIR))
    if user_config_file().is_file():
        return _load_json_file(user_config_file())
    if not required:
        return None
    raise NoConfigError(
        f"No --config given, ${CONFIG_ENV} is not set, and there is no {DEFAULT_CONFIG_FILE} "
        f"or {DEFAULT_CREDENTIALS_DIR}/ in {Path.cwd()}, nor {user_config_file()}. "
        f"Run `{INIT_COMMAND}` to write one to fill in "
        f"(mode 600), or pass --config FILE. A minimal working one: {MINIMAL_ENTRY}",
    )


def write_example_config(path: str | os.PathLike) -> Path:
    """Write the example configuration to ``path``, private (mode 600), never over an existing file."""
    path = Path(path)
    example = resources.files(__package__).joinpath("credentials.example.json").read_bytes()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError as exc:
        raise LocalFileError(str(path), "it already exists, and was left as it is. Edit it, or pass "
                                        "--config with another path.", action="write the example to") from exc
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be written ({exc.strerror or exc}).") from exc
    with os.fdopen(fd, "wb") as stream:
        stream.write(example)
    return path


def _load_json_file(path: Path) -> Config:
    document = _read_json(path)
    clusters_doc = document.get("clusters") if isinstance(document, dict) else None
    if not isinstance(clusters_doc, dict) or not clusters_doc:
        raise ConfigError(str(path), 'expected an object {"clusters": {"<name>": {...}, ...}} with at least one cluster.')
    unknown = sorted(set(document) - {"clusters", "total_rows", "settle_seconds"} - set(_comments(document)))
    if unknown:
        raise ConfigError(str(path), f"unknown top-level field(s) {', '.join(map(repr, unknown))}; "
                                     f"the file holds \"clusters\" and, optionally, \"total_rows\" "
                                     f"and \"settle_seconds\" (and comments: fields whose name starts with _).")
    settle = document.get("settle_seconds")
    if settle is not None and (not isinstance(settle, (int, float)) or isinstance(settle, bool)
                               or not 0 <= settle < float("inf")):
        raise ConfigError(str(path), "\"settle_seconds\" must be a number of seconds, 0 or more: how long "
                                     "after its last write a file counts as finished.")
    total_rows = document.get("total_rows")
    if total_rows is not None and (not isinstance(total_rows, int) or isinstance(total_rows, bool) or total_rows < 1):
        raise ConfigError(str(path), "\"total_rows\" must be a positive whole number: the rows of the "
                                     "whole run, articles and others.")
    warnings = []
    clusters = {}
    for name, entry in clusters_doc.items():
        clusters[name] = _parse_cluster(name, entry, str(path))
        warnings += _secret_permission_warnings(path, clusters[name])
    return Config(clusters, str(path), tuple(dict.fromkeys(warnings)), total_rows,
                  None if settle is None else float(settle))


def _load_credentials_dir(directory: Path) -> Config:
    if not directory.is_dir():
        raise ConfigError(str(directory), "this credentials directory does not exist.")
    files = sorted(directory.glob("*.credentials"))
    if not files:
        raise ConfigError(str(directory), "no <cluster>.credentials files in this directory.")
    warnings = []
    clusters = {}
    for path in files:
        clusters[path.stem] = _parse_cluster(path.stem, _read_json(path), str(path))
        warnings += _secret_permission_warnings(path, clusters[path.stem])
    return Config(clusters, str(directory), tuple(warnings))


def _read_json(path: Path):
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(str(path), "the file does not exist.") from exc
    except json.JSONDecodeError as exc:
        # The message names line and column but never echoes the content:
        # the file may hold passwords.
        raise ConfigError(str(path), f"not valid JSON (line {exc.lineno}, column {exc.colno}).") from exc
    except OSError as exc:
        raise ConfigError(str(path), f"cannot be read: {os_error_problem(exc, path)}") from exc


def _parse_cluster(name: str, entry, source: str) -> ClusterConfig:
    where = f"cluster {name!r}"
    if not isinstance(entry, dict):
        raise ConfigError(source, f"{where} must be a JSON object of settings.")
    unknown = set(entry) - _KNOWN_FIELDS - set(_comments(entry))
    if unknown:
        raise ConfigError(source, f"{where} has unknown field(s) {', '.join(sorted(unknown))}; "
                                  f"the known ones are {', '.join(sorted(_KNOWN_FIELDS))}.")
    for required in ("host", "remote_dir"):
        if not isinstance(entry.get(required), str) or not entry[required]:
            raise ConfigError(source, f"{where} needs a non-empty string field {required!r}.")
    port = entry.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ConfigError(source, f"{where}: 'port' must be a whole number from 1 to 65535.")
    for optional in ("username", "key_file", "password", "passphrase", "known_hosts", "host_key_policy",
                     "ssh_config", "proxy_jump"):
        if optional in entry and not isinstance(entry[optional], str):
            raise ConfigError(source, f"{where}: {optional!r} must be a string.")
    patterns = entry.get("pattern", list(DEFAULT_PATTERNS))
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(source, f"{where}: 'pattern' must be a glob string or a list of them.")
    policy = entry.get("host_key_policy", "strict")
    if policy not in HOST_KEY_POLICIES:
        raise ConfigError(source, f"{where}: 'host_key_policy' must be one of {', '.join(HOST_KEY_POLICIES)}.")
    key_file = entry.get("key_file")
    if key_file is not None:
        _check_key_file(source, name, key_file)
    return ClusterConfig(
        name=name,
        host=entry["host"],
        port=port,
        username=entry.get("username"),
        key_file=key_file,
        password=entry.get("password"),
        passphrase=entry.get("passphrase"),
        remote_dir=entry["remote_dir"],
        patterns=tuple(patterns),
        known_hosts=entry.get("known_hosts"),
        host_key_policy=policy,
        ssh_config=entry.get("ssh_config"),
        proxy_jump=entry.get("proxy_jump"),
        source=source,
    )


def _comments(document: dict) -> list[str]:
    """JSON has no comments: a field whose name starts with ``_`` (``"_total_rows"``) is one, and ignored."""
    return [key for key in document if isinstance(key, str) and key.startswith("_")]


def _check_key_file(source: str, cluster: str, key_file: str) -> None:
    path = Path(key_file).expanduser()
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError as exc:
        raise ConfigError(source, f"cluster {cluster!r}: the key_file {key_file} does not exist.") from exc
    except OSError as exc:
        raise ConfigError(source, f"cluster {cluster!r}: the key_file {key_file} cannot be "
                                  f"read: {os_error_problem(exc, path)}") from exc
    if mode & 0o077:
        raise KeyPermissionError(source, cluster, str(path), mode)


def _secret_permission_warnings(path: Path, cluster: ClusterConfig) -> list[str]:
    if cluster.password is None and cluster.passphrase is None:
        return []
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return []
    if mode & 0o077:
        secret = "a password" if cluster.password is not None else "a key's passphrase"
        return [f"{path} holds {secret} and is readable by group or "
                f"others (mode {mode:04o}); fix it with: chmod 600 {path}"]
    return []
