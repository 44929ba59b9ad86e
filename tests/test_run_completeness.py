"""A result that looks complete is complete: a cluster left out, checkpoints that stop short of
the run's declared rows, or files the cluster no longer holds never make one silently (a file purged
from the cluster whose copy a sync verified: tests/test_purged_checkpoints.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.layout import DownloadLayout
from async_embed_sync.testing.synthetic import generate_run

ROWS = 400  # 2 clusters x 2 GPUs; 10 questions at the end


def _two_clusters(tmp_path: Path, openssh, write_config, **run) -> tuple[Path, Path]:
    remote = tmp_path / "remote"
    generate_run(remote, rows=ROWS, dim=8, gpus_per_cluster=2, **run)
    _written_an_hour_ago(remote)
    config = write_config(tmp_path, {name: openssh.cluster_entry(str(remote / name))
                                     for name in ("tensor01", "tensor02")})
    return remote, config


def _written_an_hour_ago(folder: Path) -> None:
    """The cluster's files were written long ago: none is "still being written" (the settle window)."""
    an_hour_ago = time.time() - 3600
    for path in folder.rglob("*"):
        os.utime(path, (an_hour_ago, an_hour_ago))


def _run(config: Path, tmp_path: Path, *extra: str, output: str = "merged.pkl") -> int:
    return main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(tmp_path / output), "--quiet", *extra])


def test_a_cluster_left_out_of_run_is_refused_before_anything_is_done(openssh, tmp_path, write_config, capsys):
    _, config = _two_clusters(tmp_path, openssh, write_config)

    assert _run(config, tmp_path, "--clusters", "tensor01") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Nothing was run: --clusters tensor01 leaves out tensor02")
    assert "--partial" in err and str(config) in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "dl").exists() and not (tmp_path / "merged.pkl").exists()

    # Only downloading one cluster is fine.
    assert _run(config, tmp_path, "--clusters", "tensor01", "--sync-only") == 0


def test_partial_merges_the_clusters_named_and_says_so(openssh, tmp_path, write_config, capsys):
    _, config = _two_clusters(tmp_path, openssh, write_config)
    assert _run(config, tmp_path) == 0  # both downloaded: tensor02's files are here too
    capsys.readouterr()

    assert main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(tmp_path / "half.pkl"), "--clusters", "tensor01", "--partial"]) == 0
    err = capsys.readouterr().err
    notice = f"PARTIAL (--partial): the merge leaves out tensor02, configured in {config}."
    assert err.startswith(notice)
    assert err.rstrip().endswith(f"  {notice}")  # and again under the merge's summary
    half = load(tmp_path / "half.pkl")
    # Exactly tensor01's rows (0..199, all articles), although tensor02's files are downloaded.
    assert [c["cluster"] for c in half["chunk_info"]] == ["tensor01", "tensor01"]
    assert half["total_articles"] == ROWS // 2


def test_checkpoints_short_of_their_total_rows_do_not_merge(tmp_path, capsys):
    downloads = tmp_path / "dl"
    generate_run(downloads, rows=ROWS, dim=8, gpus_per_cluster=2, declare_total=True)
    for path in (downloads / "tensor02").iterdir():
        path.unlink()  # the cluster holding the last rows was never synced
    (downloads / "tensor02").rmdir()
    output = tmp_path / "merged.pkl"

    assert main(["merge", "--download-dir", str(downloads), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    assert "rows 200..399 are missing" in err and "400 rows (total_rows in its checkpoints)" in err
    assert err.splitlines()[-1].startswith("error: ") and "Traceback" not in err and not output.exists()

    assert main(["merge", "--download-dir", str(downloads), "--output", str(output), "--partial"]) == 0
    assert "PARTIAL (--partial): this result lacks the rows at indices 200..399" in capsys.readouterr().err
    assert load(output)["total_articles"] == 200


def test_the_configs_total_rows_is_the_run_s_size(openssh, tmp_path, write_config, capsys):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    for path in (remote / "tensor02").glob("embeddings_gpu1_*"):
        path.unlink()  # the last GPU's job did not finish
    document = json.loads(config.read_text())
    config.write_text(json.dumps({**document, "total_rows": ROWS}))

    assert _run(config, tmp_path) == 1
    err = capsys.readouterr().err
    assert "rows 300..399 are missing" in err and "(total_rows in the config)" in err
    assert not (tmp_path / "merged.pkl").exists()


def test_checkpoints_that_disagree_on_total_rows_are_refused(tmp_path, capsys):
    downloads = tmp_path / "dl"
    generate_run(downloads, rows=ROWS, dim=8, gpus_per_cluster=2, declare_total=True, fmt="npy")
    sidecar = next((downloads / "tensor02").glob("*.json"))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "total_rows": 500}))

    assert main(["merge", "--download-dir", str(downloads), "--output", str(tmp_path / "m.pkl")]) == 1
    err = capsys.readouterr().err
    assert "are they from the same run?" in err and f"{sidecar.stem}.npy says 500" in err


def test_run_merges_what_the_clusters_hold_now_after_a_re_split(openssh, tmp_path, write_config, capsys):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    assert _run(config, tmp_path) == 0
    # On tensor02, GPU 1's piece is written again as two files (periodic checkpoints): the old
    # file is gone from the cluster but still here, and overlaps the new ones.
    old = sorted((remote / "tensor02").glob("embeddings_gpu1_*.pkl"))
    assert len(old) == 1
    old[0].unlink()
    scratch = tmp_path / "resplit"
    generate_run(scratch, rows=ROWS, dim=8, gpus_per_cluster=2, files_per_gpu=2)
    _written_an_hour_ago(scratch)
    for path in (scratch / "tensor02").glob("embeddings_gpu1_*.pkl"):
        os.replace(path, remote / "tensor02" / path.name)
    capsys.readouterr()

    assert main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(tmp_path / "again.pkl")]) == 0
    err = capsys.readouterr().err
    assert "tensor02: 1 file(s) kept here, gone from the cluster (purged from scratch?): " in err
    assert old[0].name in err.split("kept here, gone from the cluster")[1]
    assert f"left out 1 checkpoint(s) that their cluster no longer held at the last sync: tensor02/{old[0].name}" in err
    # A copy the first sync verified, but the cluster's current files cover its rows: they win.
    assert DownloadLayout(tmp_path / "dl").load_state("tensor02", old[0].name).complete
    assert "kept: " not in err
    result = load(tmp_path / "again.pkl")
    assert result["total_articles"] == ROWS - 10
    assert old[0].name not in [c["file"] for c in result["chunk_info"]]
    assert len(result["chunk_info"]) == 5
    assert (tmp_path / "dl" / "tensor02" / old[0].name).is_file()  # kept, never deleted

    # The standalone merge takes the same view of the download directory.
    assert main(["merge", "--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "m.pkl"),
                 "--quiet"]) == 0
    assert load(tmp_path / "m.pkl")["chunk_info"] == [
        {**c} for c in load(tmp_path / "again.pkl")["chunk_info"]]


@pytest.mark.parametrize("bad", [0, -3, "400", True])
def test_the_configs_total_rows_must_be_a_positive_whole_number(tmp_path, write_config, capsys, bad):
    config = write_config(tmp_path, {"tensor01": {"host": "h", "remote_dir": "/d"}})
    config.write_text(json.dumps({**json.loads(config.read_text()), "total_rows": bad}))
    assert main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 1
    assert '"total_rows" must be a positive whole number' in capsys.readouterr().err


def test_a_merge_after_a_sync_that_found_a_file_still_being_written_refuses_to_mix_versions(
        openssh, tmp_path, write_config, capsys):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    assert _run(config, tmp_path) == 0
    # The job of GPU 0 on tensor01 writes its piece again: the old copy here is no longer
    # the run's, and the new one is still being written.
    [piece] = sorted((remote / "tensor01").glob("embeddings_gpu0_*.pkl"))
    piece.write_bytes(piece.read_bytes()[: piece.stat().st_size // 2])
    capsys.readouterr()
    assert _run(config, tmp_path, output="again.pkl") == 1
    err = capsys.readouterr().err
    assert f"Cluster 'tensor01': {piece.name} is still being written (last modified " in err
    assert f"error: The sync did not finish. tensor01: still being written there: {piece.name} (run again" in err
    assert not (tmp_path / "again.pkl").exists()

    # `merge` alone does not take the old copy beside the cluster's other files.
    assert main(["merge", "--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "again.pkl")]) == 1
    err = capsys.readouterr().err
    assert (f"error: The checkpoints cannot be merged: 1 file(s) here are not the version their cluster's last sync listed: tensor01/{piece.name} "
            f"(a newer version is partly fetched: still being written there, or the sync stopped). Merging them "
            f"would mix versions of the run.") in err
    assert "Traceback" not in err and not (tmp_path / "again.pkl").exists()


def test_a_synced_file_damaged_here_is_not_complete_and_the_next_sync_fetches_it_again(
        openssh, tmp_path, write_config, capsys):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    assert _run(config, tmp_path) == 0
    [damaged] = sorted((tmp_path / "dl" / "tensor01").glob("embeddings_gpu0_*.pkl"))
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, the same size: only its hash tells
    damaged.write_bytes(bytes(data))
    capsys.readouterr()

    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("tensor01"))
    assert row.split()[4:7] == ["1", "0", "1"], row  # complete, partial, changed

    assert main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet"]) == 0
    assert damaged.read_bytes() == (remote / "tensor01" / damaged.name).read_bytes()
    assert _run(config, tmp_path, output="again.pkl") == 0
