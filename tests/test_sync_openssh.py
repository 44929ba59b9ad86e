"""The sync against the real OpenSSH sshd on loopback."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from openssh import keygen
from reliability_helpers import assert_mirrored

from async_embed_sync.cli import main
from async_embed_sync.config import load_config
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.progress import QuietProgress
from async_embed_sync.transfer.sync import SyncOptions, sync

PASSWORD = "hunter2-not-a-real-one"


def _remote_tree(tmp_path: Path) -> dict[str, Path]:
    """Two cluster directories with checkpoint-like files (and one that is not)."""
    dirs = {}
    for index, cluster in enumerate(("tensor01", "tensor02")):
        directory = tmp_path / "remote" / cluster
        directory.mkdir(parents=True)
        for gpu in range(3):
            size = 3_000_000 + 700_001 * gpu + index
            (directory / f"emb_gpu{gpu}.pkl").write_bytes(os.urandom(size))
        (directory / "emb_gpu3.npy").write_bytes(os.urandom(1_234_567))
        (directory / "emb_gpu3.json").write_text('{"start_index": 0}')
        (directory / "notes.txt").write_text("not a checkpoint")
        dirs[cluster] = directory
    return dirs


def _sync(config_path: Path, download_dir: Path, **options):
    clusters = load_config(config_path).select(None)
    return sync(clusters, str(download_dir), QuietProgress(), SyncOptions(**options))


def _assert_mirrored(remote_dir: Path, local_dir: Path) -> None:
    expected = sorted(p.name for p in remote_dir.iterdir() if p.suffix != ".txt")
    assert sorted(p.name for p in local_dir.iterdir()) == expected
    assert_mirrored(remote_dir, local_dir, expected)


def test_two_clusters_byte_identical_then_incremental(openssh, tmp_path, write_config):
    dirs = _remote_tree(tmp_path)
    config = write_config(tmp_path, {c: openssh.cluster_entry(str(d)) for c, d in dirs.items()})
    download_dir = tmp_path / "dl"

    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir),
                 "--max-parallel", "3", "--quiet"]) == 0
    for cluster, remote_dir in dirs.items():
        _assert_mirrored(remote_dir, download_dir / cluster)
        layout = DownloadLayout(download_dir)
        state = layout.load_state(cluster, "emb_gpu0.pkl")
        assert state.complete and state.verified_by == "sha256"  # sshd has a shell
        # The merge can take each file's sha256 from the journal instead of hashing it again.
        for path in (download_dir / cluster).iterdir():
            assert layout.verified_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest(), path

    # Second run: nothing changed, nothing transferred.
    report = _sync(config, download_dir)
    assert report.ok and report.transferred == 0
    assert all(c.skipped == 5 and c.downloaded == 0 for c in report.clusters.values())

    # A file changed remotely (new content, same size, new mtime) is fetched again.
    changed = dirs["tensor02"] / "emb_gpu1.pkl"
    changed.write_bytes(os.urandom(changed.stat().st_size))
    os.utime(changed, (time.time() - 1800, time.time() - 1800))  # rewritten, and finished, half an hour ago
    report = _sync(config, download_dir)
    assert report.ok
    assert report.clusters["tensor02"].downloaded == 1
    assert report.transferred == changed.stat().st_size
    _assert_mirrored(dirs["tensor02"], download_dir / "tensor02")


def test_clusters_option_limits_the_sync_and_progress_is_shown(openssh, tmp_path, write_config,
                                                                capsys):
    dirs = _remote_tree(tmp_path)
    config = write_config(tmp_path, {c: openssh.cluster_entry(str(d)) for c, d in dirs.items()})
    download_dir = tmp_path / "dl"
    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir),
                 "--clusters", "tensor02"]) == 0
    assert not (download_dir / "tensor01").exists()
    _assert_mirrored(dirs["tensor02"], download_dir / "tensor02")
    # Not a terminal: plain lines, then the summary table.
    err = capsys.readouterr().err
    assert "tensor02: emb_gpu0.pkl downloaded" in err
    summary = err[err.index("\ncluster ") + 1:].splitlines()
    assert summary[1].split()[:2] == ["tensor02", "5"] and summary[1].split()[-1] == "sftp/sha256"


def _run_failing(capsys, config: Path, download_dir: Path) -> str:
    code = main(["sync", "--config", str(config), "--download-dir", str(download_dir),
                 "--quiet", "--timeout", "5", "--retries", "0"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_host_key_is_refused_with_the_fix(openssh, tmp_path, write_config, capsys):
    dirs = _remote_tree(tmp_path)
    empty_known_hosts = tmp_path / "known_hosts_empty"
    empty_known_hosts.write_text("")
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(
        str(dirs["tensor01"]), known_hosts=str(empty_known_hosts))})
    err = _run_failing(capsys, config, tmp_path / "dl")
    assert "tensor01" in err and "ssh-keyscan" in err and str(empty_known_hosts) in err
    assert not (tmp_path / "dl" / "tensor01").exists()


def test_changed_host_key_is_refused_loudly(openssh, tmp_path, write_config, capsys):
    dirs = _remote_tree(tmp_path)
    impostor = tmp_path / "known_hosts_other"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path / 'other_host_key'}")
    other_key = (tmp_path / "other_host_key.pub").read_text().split()[:2]
    impostor.write_text(f"[127.0.0.1]:{openssh.port} {' '.join(other_key)}\n")
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(
        str(dirs["tensor01"]), known_hosts=str(impostor))})
    err = _run_failing(capsys, config, tmp_path / "dl")
    assert "does not match" in err and "ssh-keygen -R" in err
    assert not (tmp_path / "dl" / "tensor01").exists()


def test_authentication_failure_never_shows_the_password(openssh, tmp_path, write_config, capsys):
    dirs = _remote_tree(tmp_path)
    entry = openssh.cluster_entry(str(dirs["tensor01"]), password=PASSWORD)
    del entry["key_file"]
    config = write_config(tmp_path, {"tensor01": entry})
    err = _run_failing(capsys, config, tmp_path / "dl")
    assert "refused the login as 'root'" in err and "tensor01" in err
    assert "the password in the configuration (not sent: the server asked for no password)" in err
    assert "The server takes no password here: set `key_file` for this cluster" in err
    assert PASSWORD not in err
    for path in (tmp_path / "dl").rglob("*"):
        assert not path.is_file() or PASSWORD.encode() not in path.read_bytes()


def test_missing_remote_dir_and_empty_dir_are_named(openssh, tmp_path, write_config, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path, {
        "tensor01": openssh.cluster_entry(str(tmp_path / "does-not-exist")),
        "tensor02": openssh.cluster_entry(str(empty)),
    })
    err = _run_failing(capsys, config, tmp_path / "dl")
    assert f"{tmp_path / 'does-not-exist'} cannot be listed" in err
    assert "no checkpoint files matching" in err and str(empty) in err


def test_unreachable_host_fails_alone(openssh, tmp_path, write_config, capsys):
    dirs, closed_port, config = _tensor01_on_a_closed_port(openssh, tmp_path, write_config)
    err = _run_failing(capsys, config, tmp_path / "dl")
    # The cause in plain words, not asyncio's "Connect call failed ('127.0.0.1', PORT)".
    assert f"cannot connect to 127.0.0.1:{closed_port} (connection refused: nothing listens on " \
           f"127.0.0.1:{closed_port})." in err, err
    assert "Connect call failed" not in err and "Errno" not in err, err
    summary = err[err.index("The sync did not finish"):]
    assert f"tensor01: 127.0.0.1:{closed_port} cannot be reached (check host and port; a rerun resumes once it answers)" in summary
    assert "tensor02" not in summary and "not listed" not in summary
    # Each error is shown once, not again in the closing summary.
    assert err.count(f"cannot connect to 127.0.0.1:{closed_port}") == 1
    # The failing cluster did not stop the other one.
    _assert_mirrored(dirs["tensor02"], tmp_path / "dl" / "tensor02")


def test_status_shows_the_table_then_each_error_once_below_it(openssh, tmp_path, write_config, capsys):
    dirs, closed_port, config = _tensor01_on_a_closed_port(openssh, tmp_path, write_config)
    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--timeout", "5"]) == 1
    out, err = capsys.readouterr()
    header, tensor01, tensor02, *below = out.splitlines()
    assert header.startswith("cluster ") and tensor02.split()[0] == "tensor02" and tensor02.split()[1].isdigit(), out
    # The row points below; a paragraph in the row would wrap across the 80 columns.
    assert tensor01 == "tensor01 error (see below)", out
    assert all(len(line) <= 80 for line in (header, tensor01, tensor02)), out
    assert below == [] and err.splitlines() == [f"error: Cluster 'tensor01': cannot connect to 127.0.0.1:{closed_port} (connection refused: nothing "
                     f"listens on 127.0.0.1:{closed_port}). Check the host name and port in the configuration, "
                     f"and that the machine is reachable (for example with: ssh -p {closed_port} 127.0.0.1)."], out


def _tensor01_on_a_closed_port(openssh, tmp_path: Path, write_config) -> tuple[dict[str, Path], int, Path]:
    """Two clusters: tensor01 at a port where nothing listens, tensor02 the real sshd."""
    dirs = _remote_tree(tmp_path)
    closed_port = _closed_port()
    config = write_config(tmp_path, {
        "tensor01": openssh.cluster_entry(str(dirs["tensor01"]), port=closed_port),
        "tensor02": openssh.cluster_entry(str(dirs["tensor02"])),
    })
    return dirs, closed_port, config


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_passphrase_protected_key_from_ssh_keygen_logs_in(openssh, tmp_path, write_config):
    # ssh-keygen -N writes the OpenSSH format, encrypted with bcrypt's KDF:
    # the README's install must be able to decrypt it (asyncssh's bcrypt extra).
    key = tmp_path / "id_ed25519_encrypted"
    keygen(key, passphrase=PASSWORD)
    assert b"PASSWORD" not in key.read_bytes() and key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    openssh.authorize(key.with_suffix(".pub"))
    dirs = _remote_tree(tmp_path)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(
        str(dirs["tensor01"]), key_file=str(key), passphrase=PASSWORD)})

    assert main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet"]) == 0
    _assert_mirrored(dirs["tensor01"], tmp_path / "dl" / "tensor01")


def test_the_closing_line_tells_what_a_rerun_fixes_from_what_it_cannot(openssh, tmp_path, write_config, capsys):
    dirs = _remote_tree(tmp_path)
    config = write_config(tmp_path, {
        "tensor01": openssh.cluster_entry(str(tmp_path / "no-such-dir")),
        "tensor02": openssh.cluster_entry(str(dirs["tensor02"]), known_hosts=str(tmp_path / "empty_known_hosts")),
    })
    (tmp_path / "empty_known_hosts").write_text("")
    err = _run_failing(capsys, config, tmp_path / "dl")
    closing = err.strip().splitlines()[-1]
    assert closing.startswith("error: The sync did not finish.")
    assert "tensor01: remote_dir cannot be listed (fix this first: a rerun alone will not)" in closing
    assert "tensor02: its host key is not trusted yet (fix this first: a rerun alone will not)" in closing
    assert closing.endswith("Nothing was downloaded; fix the errors above as they say, then run the same command "
                            "again.") and "not listed" not in closing
