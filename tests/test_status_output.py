"""`status`: the table on stdout, each cluster's error on stderr (never "Nothing was downloaded":
status downloads nothing), columns a newcomer reads right within 80 columns, and `--json`."""

from __future__ import annotations

import json
import os
import socket
import time

from async_embed_sync.cli import main
from async_embed_sync.layout import DownloadLayout, FileState


def _old(path):
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_host_key_errors_go_to_stderr_and_do_not_say_nothing_was_downloaded(
        openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 100)
    (tmp_path / "empty_known_hosts").write_text("")
    impostor = tmp_path / "known_hosts_other"
    os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path / 'other_host_key'}")
    other_key = (tmp_path / "other_host_key.pub").read_text().split()[:2]
    impostor.write_text(f"[127.0.0.1]:{openssh.port} {' '.join(other_key)}\n")
    config = write_config(tmp_path, {
        "unknown1": openssh.cluster_entry(str(remote), known_hosts=str(tmp_path / "empty_known_hosts")),
        "changed1": openssh.cluster_entry(str(remote), known_hosts=str(impostor)),
    })
    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines()[1:] == ["unknown1 error (see below)", "changed1 error (see below)"], out
    unknown, changed = err.splitlines()
    assert unknown.startswith("error: Cluster 'unknown1': the host key of ") and "ssh-keyscan" in unknown
    assert "the connection was closed before the login, and nothing was read from it" in unknown, unknown
    assert changed.startswith("error: Cluster 'changed1': WARNING: the host key of ") and "ssh-keygen -R" in changed
    assert "no password or key was offered to it, and nothing was read from it" in changed, changed
    assert "downloaded" not in err.lower(), err
    assert not (tmp_path / "dl").exists()


def test_status_columns_say_what_is_to_fetch_and_what_is_only_here_within_80_columns(
        openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "done.pkl").write_bytes(os.urandom(1000))
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    layout = DownloadLayout(tmp_path / "dl")
    assert main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet"]) == 0
    for name, size in (("half.pkl", 400_000), ("new.pkl", 1000)):  # written on the cluster since
        (remote / name).write_bytes(os.urandom(size))
        _old(remote / name)
    stat = (remote / "half.pkl").stat()
    layout.partial_path("tensor01", "half.pkl").write_bytes((remote / "half.pkl").read_bytes()[:100_000])
    layout.save_state("tensor01", "half.pkl", FileState(remote_size=stat.st_size, remote_mtime=int(stat.st_mtime),
                                                       verified_offset=100_000))
    (tmp_path / "dl" / "tensor01" / "by_hand.pkl").write_bytes(b"put here by hand")
    capsys.readouterr()

    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 0
    out, err = capsys.readouterr()
    header, row, *notes = out.splitlines()
    assert header == "cluster  remote      size complete    partial changed to fetch only here"
    assert row == "tensor01      3 392.6 KiB        1   1 (25 %)       0        1         1"
    assert notes[0] == ("tensor01: 1 partial file(s): 97.7 KiB of 390.6 KiB verified here so far (25 %); the next "
                        "sync resumes them.")
    assert "by_hand.pkl" in notes[1]
    assert all(len(line) <= 80 for line in (header, row)) and err == ""


def test_status_json_is_one_document_on_stdout_and_errors_stay_on_stderr(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 100)
    _old(remote / "a.pkl")
    port = _closed_port()
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote)),
                                     "tensor02": {**openssh.cluster_entry(str(remote)), "port": port}})
    assert main(["status", "--json", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 1
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["download_dir"] == str(tmp_path / "dl") and document["in_flight"] is None
    first, second = document["clusters"]
    assert first["name"] == "tensor01" and first["remote_files"] == 1 and first["to_fetch"] == 1
    assert first["error"] is None and second["name"] == "tensor02"
    assert second["error"].startswith(f"Cluster 'tensor02': cannot connect to 127.0.0.1:{port}")
    assert err.splitlines() == [f"error: {second['error']}"]
