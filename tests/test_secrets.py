"""No password or passphrase ever shows: not in output, logs, errors or state."""

from __future__ import annotations

import io
import logging
import os
import re

import anyio
import asyncssh
import pytest

from async_embed_sync.cli import main
from async_embed_sync.config import load_config
from async_embed_sync.progress import PlainProgress
from async_embed_sync.transfer.sync import SyncOptions, sync_clusters

pytestmark = pytest.mark.anyio

PASSWORD = "pw-Zq81-very-secret"
PASSPHRASE = "pp-Xv27-very-secret"
WRONG = "wr-Kd55-very-secret"
SECRETS = (PASSWORD, PASSPHRASE, WRONG)


def _encrypted_copy(key_path, passphrase, target):
    asyncssh.read_private_key(str(key_path)).write_private_key(str(target), passphrase=passphrase)
    target.chmod(0o600)
    return str(target)


async def test_secrets_never_appear(tmp_path, embedded_server, write_config, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    asyncssh.set_debug_level(2)
    root = tmp_path / "srv"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "a.pkl").write_bytes(os.urandom(50_000))
    output = io.StringIO()
    try:
        async with embedded_server(root, password=PASSWORD) as server:
            with_password = server.cluster_entry("/ckpt", password=PASSWORD)
            del with_password["key_file"]
            wrong_password = {**with_password, "password": WRONG}
            with_passphrase = server.cluster_entry(
                "/ckpt", passphrase=PASSPHRASE,
                key_file=_encrypted_copy(server.client_key_path, PASSPHRASE, tmp_path / "enc_key"))
            wrong_passphrase = {**with_passphrase, "passphrase": WRONG}
            config = write_config(tmp_path, {"good-password": with_password, "bad-password": wrong_password,
                                             "good-passphrase": with_passphrase,
                                             "bad-passphrase": wrong_passphrase})
            loaded = load_config(config)
            report = await sync_clusters(loaded.select(None), str(tmp_path / "dl"),
                                         PlainProgress(output, interval=0), SyncOptions(timeout=10))
    finally:
        asyncssh.set_debug_level(1)
    assert report.clusters["good-password"].ok and report.clusters["good-passphrase"].ok
    assert not report.clusters["bad-password"].ok and not report.clusters["bad-passphrase"].ok
    captured = capfd.readouterr()
    seen = {
        "progress and errors": output.getvalue(),
        "stdout/stderr": captured.out + captured.err,
        "logs": "\n".join(r.getMessage() for r in caplog.records),
        "error messages": "\n".join(e for c in report.clusters.values() for e in c.errors),
        "config repr": repr(loaded),
        "state files": "\n".join(p.read_text(errors="replace")
                                 for p in (tmp_path / "dl").rglob("*") if p.is_file()),
    }
    assert caplog.records, "asyncssh debug logging was captured"
    for where, text in seen.items():
        for secret in SECRETS:
            assert secret not in text, f"a secret appeared in {where}"


@pytest.mark.parametrize("log_flags", [["-v"], ["--debug"], ["--log-file", "LOG"], ["--debug", "--log-file", "LOG"]])
async def test_logs_at_every_level_say_what_was_decided_and_no_secret(
        tmp_path, embedded_server, write_config, capfd, log_flags):
    root = tmp_path / "srv"
    (root / "ckpt").mkdir(parents=True)
    (root / "ckpt" / "a.pkl").write_bytes(os.urandom(50_000))
    log_file = tmp_path / "sync.log"
    flags = [str(log_file) if flag == "LOG" else flag for flag in log_flags]
    async with embedded_server(root, password=PASSWORD) as server:
        good = server.cluster_entry("/ckpt", password=PASSWORD)
        del good["key_file"]
        config = write_config(tmp_path, {"tensor01": good, "tensor02": {**good, "password": WRONG}})
        argv = ["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet", *flags]
        code = await anyio.to_thread.run_sync(main, argv)  # the server runs on this loop
    assert code == 1  # tensor02's password is wrong
    err = capfd.readouterr().err
    logged = log_file.read_text() if log_file.exists() else ""
    for text in (err, logged):
        for secret in SECRETS:
            assert secret not in text
    verbose_on_stderr = "-v" in flags or "--debug" in flags
    decisions = err if verbose_on_stderr else logged
    assert "cluster 'tensor01': connected to 127.0.0.1" in decisions
    assert "a.pkl complete (50000 bytes), verified by sha256 against the server's sha256sum" in decisions
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO async_embed_sync", decisions, re.M)
    if not verbose_on_stderr:
        assert "INFO" not in err  # a log file alone leaves stderr as it was
    assert ("DEBUG asyncssh" in decisions) == ("--debug" in flags)
    assert logging.getLogger("async_embed_sync").handlers == []  # main() put the loggers back


def test_a_record_that_arrives_after_the_log_file_is_closed_does_not_reopen_it(tmp_path):
    # Another thread may hold the handler list main() installed (here: an
    # in-process server logging its teardown) and emit after main() returned.
    from async_embed_sync.logs import configure_logging

    log_file = tmp_path / "sync.log"
    restore = configure_logging(0, str(log_file))
    late_handlers = list(logging.getLogger("asyncssh").handlers)
    logging.getLogger("async_embed_sync").warning("before the end")
    restore()
    record = logging.LogRecord("asyncssh", logging.WARNING, __file__, 1, "after the end", None, None)
    for handler in late_handlers:
        handler.handle(record)
    assert all(getattr(handler, "stream", None) is None for handler in late_handlers if isinstance(handler, logging.FileHandler))
    assert "before the end" in log_file.read_text()
    assert "after the end" not in log_file.read_text()
