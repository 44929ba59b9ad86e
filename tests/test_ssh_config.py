"""The OpenSSH client config, read by OpenSSH itself (``ssh -G``): which
settings apply to a cluster, and in which order (the cluster's own fields,
then the config, then ssh's defaults); where there is no ``ssh`` to read it.

Real ``ssh -G`` on real config files; the missing client is a path that
does not exist, given as ``resolve_target``'s ``ssh_command``.
"""

from __future__ import annotations

import functools
import logging
import os
import pwd
import shutil
from pathlib import Path

import anyio
import pytest

from async_embed_sync.config import load_config
from async_embed_sync.errors import ConfigError
from async_embed_sync.transfer.remote import ClusterRemote
from async_embed_sync.transfer.target import SSHTarget, resolve_target

needs_ssh = pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client is not installed")
# ssh's ``~``: the home directory the password database gives, not $HOME.
SSH_HOME = pwd.getpwuid(os.getuid()).pw_dir


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch) -> Path:
    """A home of the test's own: the developer's ~/.ssh/config is never read."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def _target(tmp_path, write_config, config_text: str | None, *, ssh_command: str = "ssh", **entry) -> SSHTarget:
    if config_text is not None:
        (tmp_path / "ssh_config").write_text(config_text)
        entry.setdefault("ssh_config", str(tmp_path / "ssh_config"))
    credentials = write_config(tmp_path, {"tensor01": {"remote_dir": "/ckpt", **entry}})
    return resolve_target(load_config(credentials).clusters["tensor01"], ssh_command=ssh_command)


def _where(target: SSHTarget) -> tuple[str, int, str]:
    return target.hostname, target.port, target.username


@needs_ssh
def test_include_match_host_and_host_patterns(tmp_path, write_config):
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "gpus.conf").write_text("Host gpu-*\n    User alice\n")
    config = (f"Include {tmp_path}/conf.d/*.conf\n"
              "Match host gpu-0*\n    Port 2201\n"
              "Host gpu-01\n    HostName 10.0.0.1\n"
              "Host *\n    UserKnownHostsFile ~/kh_all\n")
    assert _where(_target(tmp_path, write_config, config, host="gpu-01")) == ("10.0.0.1", 2201, "alice")
    # Not matched by `Match host gpu-0*`, and no HostName: the name as given.
    other = _target(tmp_path, write_config, config, host="gpu-11")
    assert _where(other) == ("gpu-11", 22, "alice")
    assert other.known_hosts == (Path(SSH_HOME, "kh_all"),)


@needs_ssh
def test_match_sees_the_clusters_own_user_and_port(tmp_path, write_config):
    config = "Match user carol\n    IdentityFile /keys/carol\nHost *\n    User bob\n    Port 2200\n"
    assert _target(tmp_path, write_config, config, host="h", username="carol").identity_files == ("/keys/carol",)
    as_bob = _target(tmp_path, write_config, config, host="h")
    assert (as_bob.port, as_bob.username, as_bob.identity_files) == (2200, "bob", ())


@needs_ssh
def test_proxy_jump_hops_are_resolved_through_the_config_too(tmp_path, write_config):
    config = ("Host compute\n    HostName 10.1.0.7\n    ProxyJump gate,carol@bastion:2300\n"
              "Host gate\n    HostName login.example.org\n    User bob\n    Port 2022\n"
              "    IdentityFile /keys/gate\n")
    target = _target(tmp_path, write_config, config, host="compute")
    assert target.proxy_jump == ("gate", "carol@bastion:2300")
    gate, bastion = (target.hop(spec) for spec in target.proxy_jump)
    assert (*_where(gate), gate.identity_files, gate.proxy_jump) == (
        "login.example.org", 2022, "bob", ("/keys/gate",), ())
    assert _where(bastion) == ("bastion", 2300, "carol")
    nothing = _target(tmp_path, write_config, "Host *\n    ProxyJump none\n    IdentityFile none\n"
                                              "    UserKnownHostsFile none\n", host="compute")
    assert (nothing.proxy_jump, nothing.identity_files, nothing.known_hosts) == (
        (), (), (Path("~/.ssh/known_hosts").expanduser(),))


@needs_ssh
def test_identity_files_are_expanded_as_ssh_expands_them(tmp_path, write_config, monkeypatch):
    """``~`` (the password database's home), ``%`` tokens and ``${VAR}``,
    which ``ssh -G`` prints unexpanded; a path may hold spaces and quotes."""
    monkeypatch.setenv("CLUSTER_KEYS", str(tmp_path / "keys"))
    config = ("Host tensor-login\n    HostName 10.0.0.5\n    User alice\n    Port 2222\n"
              "    IdentityFile ~/.ssh/id_%r@%h:%p\n"
              "    IdentityFile ${CLUSTER_KEYS}/%n\n"
              f'    IdentityFile "{tmp_path}/my keys/a \\"quoted\\" %% key"\n'
              "    IdentityFile /keys/plain\n")
    target = _target(tmp_path, write_config, config, host="tensor-login")
    assert target.identity_files == (
        f"{SSH_HOME}/.ssh/id_alice@10.0.0.5:2222",
        f"{tmp_path}/keys/tensor-login",
        f'{tmp_path}/my keys/a "quoted" % key',
        "/keys/plain")


@needs_ssh
def test_the_clusters_fields_win_then_the_config_then_sshs_defaults(tmp_path, write_config):
    config = ("Host alias\n    HostName 10.0.0.9\n    Port 2200\n    User bob\n    IdentityFile /keys/bob\n"
              f"    UserKnownHostsFile {tmp_path}/kh_bob\n    ProxyJump gate\n")
    (tmp_path / "carol_key").write_text("")
    (tmp_path / "carol_key").chmod(0o600)
    from_config = _target(tmp_path, write_config, config, host="alias")
    assert (*_where(from_config), from_config.identity_files, from_config.known_hosts, from_config.proxy_jump) == (
        "10.0.0.9", 2200, "bob", ("/keys/bob",), (tmp_path / "kh_bob",), ("gate",))
    own = _target(tmp_path, write_config, config, host="alias", port=2300, username="carol",
                  key_file=str(tmp_path / "carol_key"), known_hosts=str(tmp_path / "kh_carol"), proxy_jump="")
    assert (*_where(own), own.identity_files, own.known_hosts, own.proxy_jump) == (
        "10.0.0.9", 2300, "carol", (str(tmp_path / "carol_key"),), (tmp_path / "kh_carol",), ())
    # What the config leaves out is ssh's default, not what ssh -G prints for it.
    silent = _target(tmp_path, write_config, config, host="Elsewhere")
    assert (*_where(silent), silent.identity_files, silent.known_hosts, silent.proxy_jump) == (
        "Elsewhere", 22, silent.username, (), (Path("~/.ssh/known_hosts").expanduser(),), ())
    assert silent.username not in ("bob", "carol")
    assert silent.ssh_config == (str(tmp_path / "ssh_config"),)


@needs_ssh
def test_the_default_config_is_read_when_the_cluster_names_none(tmp_path, write_config, _home):
    (_home / ".ssh").mkdir()
    (_home / ".ssh" / "config").write_text("Host tensor-login\n    HostName 10.0.0.5\n")
    target = _target(tmp_path, write_config, None, host="tensor-login")
    assert (target.hostname, target.ssh_config) == ("10.0.0.5", (str(_home / ".ssh" / "config"),))


@needs_ssh
@pytest.mark.parametrize(("config", "words"), [
    ("Host h\n    Bogus yes\n", "line 2: Bad configuration option: bogus"),
    ("Host h\n    Port many\n", "line 2: Bad port 'many'"),
    ("Host h\n    IdentityFile ${NO_SUCH_VARIABLE_FOR_THE_TEST}/key\n", "has no value"),
], ids=["unknown-option", "bad-value", "unset-variable"])
def test_a_config_ssh_refuses_is_a_configuration_error_in_sshs_words(tmp_path, write_config, config, words):
    with pytest.raises(ConfigError) as info:
        _target(tmp_path, write_config, config, host="h")
    message = str(info.value)
    assert f"cluster 'tensor01': the ssh config {tmp_path / 'ssh_config'} cannot be read (" in message
    assert words in message
    assert info.value.source == str(tmp_path / "credentials.json")


# --------------------------------------------------------------- no ssh


def test_without_ssh_a_config_the_cluster_names_is_a_configuration_error(tmp_path, write_config):
    missing = tmp_path / "no-openssh" / "ssh"
    with pytest.raises(ConfigError) as info:
        _target(tmp_path, write_config, "Host alias\n    HostName 10.0.0.9\n", host="alias",
                ssh_command=str(missing))
    assert (f"cluster 'tensor01': the ssh config {tmp_path / 'ssh_config'} cannot be read: the OpenSSH client "
            f"`{missing}` cannot be run (No such file or directory)") in str(info.value)
    assert "install the OpenSSH client" in str(info.value)


def test_without_ssh_the_default_config_is_left_out_with_one_warning(tmp_path, write_config, _home, caplog):
    (_home / ".ssh").mkdir()
    (_home / ".ssh" / "config").write_text("Host alias\n    HostName 10.0.0.9\n    User bob\n")
    not_a_program = tmp_path / "ssh"
    not_a_program.write_text("")  # not executable: cannot be run either
    with caplog.at_level(logging.WARNING, logger="async_embed_sync"):
        targets = [_target(tmp_path, write_config, None, host="alias", ssh_command=str(not_a_program))
                   for _ in range(2)]
    # None of it applies, asyncssh is not given it either: not a part of it.
    assert {(t.hostname, t.port, t.ssh_config) for t in targets} == {("alias", 22, ())}
    assert targets[0].username != "bob"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"cluster 'tensor01': the OpenSSH client `{not_a_program}` cannot be run (Permission "
                        f"denied), so the ssh config {_home / '.ssh' / 'config'} is not read (install the OpenSSH "
                        "client, or set the cluster's host, port, username, key_file and proxy_jump)"]


def test_without_any_config_ssh_is_not_run(tmp_path, write_config, caplog):
    with caplog.at_level(logging.WARNING, logger="async_embed_sync"):
        target = _target(tmp_path, write_config, None, host="h", ssh_command=str(tmp_path / "no-ssh"))
    assert (target.hostname, target.port, target.ssh_config, target.identity_files) == ("h", 22, (), ())
    assert not caplog.records


@needs_ssh
def test_a_line_ssh_takes_and_asyncssh_does_not_is_a_configuration_error(tmp_path, write_config):
    """asyncssh applies the rest of the config as it connects (ciphers,
    IdentitiesOnly...), with a parser of its own: ``ConnectTimeout 1m`` is
    OpenSSH's time format, not asyncssh's."""
    (tmp_path / "known_hosts").write_text("")
    target = _target(tmp_path, write_config, "Host alias\n    HostName 127.0.0.1\n    Port 1\n"
                                             "    ConnectTimeout 1m\n",
                     host="alias", known_hosts=str(tmp_path / "known_hosts"))
    assert (target.hostname, target.port) == ("127.0.0.1", 1)
    with pytest.raises(ConfigError) as info:
        anyio.run(functools.partial(ClusterRemote.connect, target.cluster, timeout=5))
    assert (f"cluster 'tensor01': the ssh config {tmp_path / 'ssh_config'} cannot be read by asyncssh "
            f"({tmp_path / 'ssh_config'} line 4: Invalid ConnectTimeout integer value: 1m)") in str(info.value)
