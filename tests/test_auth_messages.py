"""A refused login says so: as whom, what was tried, what the server accepts, what to change.

Against the real sshd with keyboard-interactive on (OpenSSH's default, and
what two-factor clusters use) and nothing behind it (``UsePAM no``): a client
that keeps offering keyboard-interactive with no answers is cut off at
``MaxAuthTries`` with "Too many authentication failures", which reads like a
connection problem.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest
from openssh import OpenSSHServer, keygen, ssh_agent, sshd_available
from terminal import Terminal

from async_embed_sync.cli import main

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def kbdint_sshd(tmp_path_factory: pytest.TempPathFactory):
    if not sshd_available():
        import os
        if os.environ.get("CI") == "true":
            pytest.fail("OpenSSH sshd is not installed")
        pytest.skip("OpenSSH sshd is not installed")
    with OpenSSHServer(tmp_path_factory.mktemp("kbdint_sshd"),
                       extra_config={"KbdInteractiveAuthentication": "yes"}) as server:
        yield server


def _sync(tmp_path: Path, write_config, entry: dict) -> int:
    config = write_config(tmp_path, {"tensor01": entry})
    return main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet"])


def _sync_without_a_terminal(tmp_path: Path, write_config, entry: dict) -> tuple[int, str]:
    """The CLI with nobody to ask, as under cron or in CI, however pytest was
    started: a session of its own (no controlling terminal) and no stdin."""
    config = write_config(tmp_path, {"tensor01": entry})
    child = subprocess.run([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                            "--download-dir", str(tmp_path / "dl"), "--quiet"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, start_new_session=True,
                           timeout=60)
    return child.returncode, child.stderr


def _one_paragraph(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("Cluster 'tensor01'")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return errors[0]


def test_a_rejected_key_says_authentication_not_connection(kbdint_sshd, tmp_path, write_config):
    stranger = tmp_path / "stranger_key"
    keygen(stranger)
    code, err = _sync_without_a_terminal(tmp_path, write_config,
                                         kbdint_sshd.cluster_entry(str(tmp_path), key_file=str(stranger)))
    assert code == 1, err
    message = _one_paragraph(err)
    # Nothing arrived: no "what was verified is kept".
    assert err.rstrip().endswith("tensor01: the server refused the login (fix this first: a rerun alone will "
                                 "not). Nothing was downloaded; fix the errors above as they say, then run the "
                                 "same command again."), err

    assert "the server 127.0.0.1 refused the login as 'root'" in message
    assert f"the key {stranger} (refused)" in message
    assert "keyboard-interactive (not attempted: no terminal to answer it on)" in message
    assert "The server accepts: publickey, keyboard-interactive." in message
    # A check the user can run as shown: with the configured known_hosts, else ssh fails on the host key.
    known_hosts = kbdint_sshd.cluster_entry(str(tmp_path))["known_hosts"]
    assert (f"`ssh -p {kbdint_sshd.port} -i {stranger} -o UserKnownHostsFile={known_hosts} root@127.0.0.1` "
            f"should log in") in message
    assert "Too many authentication failures" not in message
    assert "host name and port" not in message and "cannot connect" not in message


def test_an_encrypted_key_without_a_passphrase_or_terminal_names_the_fix(kbdint_sshd, tmp_path, write_config):
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    kbdint_sshd.authorize(key.with_suffix(".pub"))
    code, err = _sync_without_a_terminal(tmp_path, write_config,
                                         kbdint_sshd.cluster_entry(str(tmp_path), key_file=str(key)))
    assert code == 1, err
    message = _one_paragraph(err)

    # The key is the cause, said first; not the generic advice about username and key_file.
    assert message.startswith(f"Cluster 'tensor01': the key {key} cannot be used: it is encrypted, and there "
                              f"is no passphrase for it: none in the configuration, and no terminal to ask "
                              f"for one; set `passphrase` for this cluster, load the key into ssh-agent "
                              f"(`ssh-add {key}`), or run the command in a terminal."), message
    assert "Check `username`" not in message
    assert "Too many authentication failures" not in message


def test_a_wrong_passphrase_says_so(kbdint_sshd, tmp_path, write_config, capsys):
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    kbdint_sshd.authorize(key.with_suffix(".pub"))
    entry = kbdint_sshd.cluster_entry(str(tmp_path), key_file=str(key), passphrase="not it")
    assert _sync(tmp_path, write_config, entry) == 1
    err = capsys.readouterr().err
    message = _one_paragraph(err)

    assert (f"the key {key} cannot be used: it is encrypted, and the configured `passphrase` does not "
            f"decrypt it; correct `passphrase` for this cluster, or load the key") in message
    assert "Check `username`" not in message
    assert "tensor01: its key cannot be used (fix this first" in err  # the closing line
    assert "not it" not in err and PASSPHRASE not in err


def _sync_at_a_terminal(tmp_path: Path, write_config, entry: dict, *options: str) -> Terminal:
    config = write_config(tmp_path, {"tensor01": entry})
    return Terminal([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                     "--download-dir", str(tmp_path / "dl"), *options])


def test_a_passphrase_mistyped_at_the_terminal_is_asked_again(kbdint_sshd, tmp_path, write_config):
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    kbdint_sshd.authorize(key.with_suffix(".pub"))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 5000)
    with _sync_at_a_terminal(tmp_path, write_config, kbdint_sshd.cluster_entry(str(remote), key_file=str(key))) \
            as terminal:
        assert f"[tensor01] Passphrase for key {key}: ".encode() in terminal.read_until(b"Passphrase for key")
        terminal.type("typo")
        assert f"[tensor01] Bad passphrase, try again for {key}: ".encode() in terminal.read_until(b"try again")
        terminal.type(PASSPHRASE)
        assert terminal.wait() == 0, terminal.text()
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == b"x" * 5000
    assert b"typo" not in terminal.screen and PASSPHRASE.encode() not in terminal.screen


def test_three_wrong_passphrases_at_the_terminal_end_in_the_reason(kbdint_sshd, tmp_path, write_config):
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    kbdint_sshd.authorize(key.with_suffix(".pub"))
    with _sync_at_a_terminal(tmp_path, write_config, kbdint_sshd.cluster_entry(str(tmp_path), key_file=str(key))) \
            as terminal:
        for attempt in range(3):
            terminal.read_until(b"Passphrase for key" if attempt == 0 else b"try again")
            terminal.type(f"wrong {attempt}")
        assert terminal.wait() == 1, terminal.text()
    screen = terminal.text()
    assert screen.count("Bad passphrase, try again") == 2, screen
    assert f"the key {key} cannot be used: it is encrypted, and the passphrase typed does not decrypt it" \
        in screen
    assert "Traceback" not in screen and "wrong 0" not in screen


def test_a_missing_identity_file_in_the_ssh_config_is_skipped_with_a_warning(
        kbdint_sshd, tmp_path, write_config, capsys):
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        "Host tensor01-login\n"
        f"  HostName {kbdint_sshd.host}\n  Port {kbdint_sshd.port}\n  User root\n"
        f"  IdentityFile {tmp_path}/id_long_gone\n"
        f"  IdentityFile {kbdint_sshd.client_key_path}\n")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 1000)
    entry = {"host": "tensor01-login", "remote_dir": str(remote), "ssh_config": str(ssh_config),
             "known_hosts": str(kbdint_sshd.known_hosts_for(kbdint_sshd.port))}

    assert _sync(tmp_path, write_config, entry) == 0
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == b"x" * 1000
    # Shown even with --quiet, as ssh shows it.
    assert (f"Warning: cluster 'tensor01': no such identity: {tmp_path}/id_long_gone (skipped, as ssh does)"
            in capsys.readouterr().err)


def _agent_with_strangers(tmp_path: Path, count: int = 8) -> list[Path]:
    """More keys than OpenSSH's MaxAuthTries (6), none of them authorized."""
    strangers = [tmp_path / f"agent_key_{index}" for index in range(count)]
    for key in strangers:
        keygen(key)
    return strangers


def test_an_agent_full_of_other_keys_does_not_lock_out_the_configured_key(
        kbdint_sshd, tmp_path, write_config, monkeypatch):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 1000)
    with ssh_agent(tmp_path, _agent_with_strangers(tmp_path)) as agent:
        monkeypatch.setenv("SSH_AUTH_SOCK", agent)
        assert _sync(tmp_path, write_config, kbdint_sshd.cluster_entry(str(remote))) == 0
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == b"x" * 1000


def test_an_encrypted_key_held_by_the_agent_needs_no_passphrase(kbdint_sshd, tmp_path, write_config, monkeypatch):
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    kbdint_sshd.authorize(key.with_suffix(".pub"))
    decrypted = tmp_path / "decrypted_for_the_agent"  # the same key, as ssh-add holds it once unlocked
    asyncssh.read_private_key(str(key), PASSPHRASE).write_private_key(str(decrypted))
    decrypted.chmod(0o600)
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"y" * 1000)
    with ssh_agent(tmp_path, [*_agent_with_strangers(tmp_path), decrypted]) as agent:
        monkeypatch.setenv("SSH_AUTH_SOCK", agent)
        assert _sync(tmp_path, write_config, kbdint_sshd.cluster_entry(str(remote), key_file=str(key))) == 0
    assert (tmp_path / "dl" / "tensor01" / "a.pkl").read_bytes() == b"y" * 1000


def test_too_many_agent_keys_without_a_key_file_says_max_auth_tries(
        kbdint_sshd, tmp_path, write_config, monkeypatch, capsys):
    entry = kbdint_sshd.cluster_entry(str(tmp_path))
    del entry["key_file"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/id_* of the machine's
    with ssh_agent(tmp_path, _agent_with_strangers(tmp_path)) as agent:
        monkeypatch.setenv("SSH_AUTH_SOCK", agent)
        assert _sync(tmp_path, write_config, entry) == 1
    err = capsys.readouterr().err
    message = _one_paragraph(err)
    assert "the server 127.0.0.1 refused the login as 'root'" in message
    assert "too many attempts (its MaxAuthTries)" in message and "IdentitiesOnly yes" in message
    assert "cannot connect" not in message and "host name and port" not in message
    assert "tensor01: the server refused the login (fix this first" in err


# ------------------------------------------------ a prompt whose connection is given up
#
# Nobody answers; the login ends without the answer (it times out, the
# server gives up, Ctrl-C). The question ends with it: the command exits by
# itself, with the terminal's echo back on, and no thread is left reading
# the terminal until Enter is pressed.


def _encrypted_key(server: OpenSSHServer, tmp_path: Path) -> Path:
    key = tmp_path / "encrypted_key"
    keygen(key, passphrase=PASSPHRASE)
    server.authorize(key.with_suffix(".pub"))
    return key


@pytest.fixture(scope="module")
def impatient_sshd(tmp_path_factory: pytest.TempPathFactory, kbdint_sshd):
    """Hangs up on a client that has not logged in after 2 seconds (``kbdint_sshd``: sshd is installed)."""
    with OpenSSHServer(tmp_path_factory.mktemp("impatient_sshd"), extra_config={"LoginGraceTime": "2"}) as server:
        yield server


@pytest.mark.parametrize(("server", "timeout", "words"), [
    ("kbdint_sshd", "2", "timed out"),
    ("impatient_sshd", "60", "the connection was closed from the other end"),
], ids=["the-login-times-out", "the-server-gives-up"])
def test_a_passphrase_prompt_ends_with_its_login(request, server, timeout, words, tmp_path, write_config):
    sshd = request.getfixturevalue(server)
    key = _encrypted_key(sshd, tmp_path)
    entry = sshd.cluster_entry(str(tmp_path), key_file=str(key))
    with _sync_at_a_terminal(tmp_path, write_config, entry, "--timeout", timeout, "--retries", "0") as terminal:
        terminal.read_until(b"Passphrase for key")
        assert terminal.wait(timeout=30) == 1, terminal.text()  # nobody pressed Enter
        assert terminal.echoes()
    assert words in terminal.text(), terminal.text()
    assert "Traceback" not in terminal.text()


def test_ctrl_c_at_a_passphrase_prompt_stops_at_once(kbdint_sshd, tmp_path, write_config):
    key = _encrypted_key(kbdint_sshd, tmp_path)
    entry = kbdint_sshd.cluster_entry(str(tmp_path), key_file=str(key))
    with _sync_at_a_terminal(tmp_path, write_config, entry, "--timeout", "60") as terminal:
        terminal.read_until(b"Passphrase for key")
        terminal.type("half typed")  # no Enter
        terminal.press_ctrl_c()
        assert terminal.wait(timeout=30) == 130, terminal.text()
        assert terminal.echoes()
    assert "Traceback" not in terminal.text() and "half typed" not in terminal.text(), terminal.text()
