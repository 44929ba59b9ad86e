"""A checkpoint purged from the cluster's scratch is merged from the copy a sync verified here, once
no file the cluster holds now covers its rows; a file no sync verified is still left out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from async_embed_sync import load
from async_embed_sync.cli import main
from async_embed_sync.errors import MergeValidationError
from async_embed_sync.fileio import file_sha256
from async_embed_sync.gone import gone_from_cluster_notice, sort_gone, verified_when
from async_embed_sync.layout import DownloadLayout, FileState
from async_embed_sync.merging.merge import merge_checkpoints
from async_embed_sync.testing.synthetic import generate_run

ROWS = 400  # 2 clusters x 2 GPUs, 100 rows each; 10 questions at the end
AN_HOUR_AGO = time.time() - 3600


def _backdate(folder: Path) -> None:
    """Written an hour ago: never "still being written" on the cluster."""
    for path in folder.rglob("*"):
        os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))


def _two_clusters(tmp_path: Path, openssh, write_config, fmt: str = "pkl") -> tuple[Path, Path]:
    remote = tmp_path / "remote"
    generate_run(remote, rows=ROWS, dim=8, gpus_per_cluster=2, fmt=fmt)
    _backdate(remote)
    config = write_config(tmp_path, {name: openssh.cluster_entry(str(remote / name))
                                     for name in ("tensor01", "tensor02")})
    return remote, config


def _run(config: Path, tmp_path: Path, output: str, *extra: str) -> int:
    return main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(tmp_path / output), *extra])


def _kept_line(download_dir: Path, cluster: str, name: str) -> str:
    state = DownloadLayout(download_dir).load_state(cluster, name)
    assert state is not None and state.complete and state.verified_at > 0
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(state.verified_at))
    return (f"kept: {cluster}/{name} is gone from {cluster} (purged from scratch?); "
            f"merged from the copy verified here on {when}")


@pytest.mark.parametrize("fmt", ["pkl", "npy"])
def test_a_checkpoint_purged_from_the_cluster_is_merged_from_its_verified_copy(
        openssh, tmp_path, write_config, capsys, fmt):
    remote, config = _two_clusters(tmp_path, openssh, write_config, fmt)
    assert _run(config, tmp_path, "first.pkl") == 0  # synced and verified: the merge of all files
    purged = sorted((remote / "tensor02").glob("embeddings_gpu1_*"))  # the .pkl, or the .npy and its sidecars
    for path in purged:
        path.unlink()  # the scratch file system's purge
    checkpoint = next(path.name for path in purged if path.suffix == f".{fmt}")
    capsys.readouterr()

    assert _run(config, tmp_path, "again.pkl") == 0
    err = capsys.readouterr().err
    assert err.count(f"tensor02/{checkpoint}") == 1  # once per file: the merge's line
    assert _kept_line(tmp_path / "dl", "tensor02", checkpoint) in err
    assert "left out 1 checkpoint" not in err and "Traceback" not in err
    first, again = load(tmp_path / "first.pkl"), load(tmp_path / "again.pkl")
    assert np.array_equal(again["embeddings"], first["embeddings"])
    assert again["articles"] == first["articles"] and again["total_articles"] == ROWS - 10
    assert again["chunk_info"] == first["chunk_info"]  # the same files, the same sha256
    for path in purged:
        assert (tmp_path / "dl" / "tensor02" / path.name).is_file()

    # The standalone merge takes the same view.
    assert main(["merge", "--download-dir", str(tmp_path / "dl"), "--output", str(tmp_path / "m.pkl")]) == 0
    assert _kept_line(tmp_path / "dl", "tensor02", checkpoint) in capsys.readouterr().err
    assert load(tmp_path / "m.pkl")["chunk_info"] == first["chunk_info"]


@pytest.mark.parametrize("total_rows", [None, ROWS], ids=["no-total_rows", "total_rows"])
def test_a_file_no_sync_verified_that_the_cluster_does_not_list_is_refused(
        openssh, tmp_path, write_config, capsys, total_rows):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    if total_rows:  # the README's advice; the file is still named, not "rows missing"
        config.write_text(json.dumps({**json.loads(config.read_text()), "total_rows": total_rows}))
    last = sorted((remote / "tensor02").glob("embeddings_gpu1_*.pkl"))[0]
    last.rename(tmp_path / last.name)  # never on the cluster while it synced...
    assert _run(config, tmp_path, "first.pkl", "--partial") == 0
    (tmp_path / last.name).rename(tmp_path / "dl" / "tensor02" / last.name)  # ...but put here by hand
    capsys.readouterr()

    assert _run(config, tmp_path, "again.pkl") == 1
    err = capsys.readouterr().err
    here = tmp_path / "dl" / "tensor02" / last.name
    assert (f"indices 300..399 are only in {here}, which tensor02 no longer held at the last sync: no sync "
            f"verified its copy here (put here by hand?), so it is not merged.") in err
    assert "--partial" in err and "kept:" not in err and err.splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "again.pkl").exists() and here.is_file()

    assert _run(config, tmp_path, "again.pkl", "--partial") == 0
    err = capsys.readouterr().err
    assert "this result lacks the rows at indices 300..399" in err
    assert f"left out 1 checkpoint(s) that their cluster no longer held at the last sync: tensor02/{last.name}" in err
    assert load(tmp_path / "again.pkl")["total_articles"] == 300


def test_status_tells_verified_copies_gone_from_the_cluster_from_files_put_here_by_hand(
        openssh, tmp_path, write_config, capsys):
    remote, config = _two_clusters(tmp_path, openssh, write_config)
    assert main(["sync", "--config", str(config), "--download-dir", str(tmp_path / "dl"), "--quiet"]) == 0
    purged = sorted((remote / "tensor02").glob("embeddings_gpu1_*.pkl"))[0]
    purged.unlink()
    (tmp_path / "dl" / "tensor02" / "by_hand.pkl").write_bytes(b"copied here by hand")
    capsys.readouterr()

    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 0
    out = capsys.readouterr().out
    header, first, second = out.splitlines()[:3]
    assert header.endswith(" only here") and len(header) <= 80
    assert second.split()[0] == "tensor02" and second.split()[-1] == "2" and first.split()[-1] == "0"
    verified_at = DownloadLayout(tmp_path / "dl").load_state("tensor02", purged.name).verified_at
    assert (f"tensor02: 1 file(s) kept here, gone from the cluster (purged from scratch?): {purged.name}, "
            f"verified here on {time.strftime('%Y-%m-%d %H:%M', time.localtime(verified_at))}. The merge takes "
            f"them from here") in out
    assert ("tensor02: 1 file(s) here are no longer on the cluster and no sync verified them (by_hand.pkl): "
            "put here by hand? They are kept, and left out of the merge") in out
    assert (tmp_path / "dl" / "tensor02" / purged.name).is_file()


# ------------------------------------------- without a cluster: the journal as a sync leaves it


def _synced(download_dir: Path, gone: dict[str, list[str]], fmt: str = "pkl", **run: object) -> None:
    """A run under ``download_dir`` as a sync leaves it, every file verified; the listing of each
    cluster lacks the names in ``gone``."""
    generate_run(download_dir, rows=ROWS, dim=8, gpus_per_cluster=2, fmt=fmt, **run)
    layout = DownloadLayout(download_dir)
    for cluster in ("tensor01", "tensor02"):
        layout.prepare(cluster)
        names = sorted(path.name for path in (download_dir / cluster).iterdir())
        for name in names:
            path = download_dir / cluster / name
            state = FileState(remote_size=path.stat().st_size, remote_mtime=int(path.stat().st_mtime))
            layout.record_complete(cluster, name, state, file_sha256(path), "sha256")
        layout.save_listing(cluster, [name for name in names if name not in gone.get(cluster, [])])


def _gpu1(download_dir: Path, cluster: str = "tensor02") -> list[str]:
    return sorted(path.name for path in (download_dir / cluster).glob("embeddings_gpu1_*"))


def test_a_copy_verified_before_the_journal_recorded_when_says_so(tmp_path):
    downloads = tmp_path / "dl"
    generate_run(tmp_path / "names", rows=ROWS, dim=8, gpus_per_cluster=2)
    _synced(downloads, {"tensor02": _gpu1(tmp_path / "names")})
    layout = DownloadLayout(downloads)
    [name] = _gpu1(downloads)
    state = layout.load_state("tensor02", name)
    state.verified_at = 0.0  # as a state written before the field existed reads
    layout.save_state("tensor02", name, state)

    report = merge_checkpoints(downloads, tmp_path / "m.pkl")
    assert [copy.path.name for copy in report.kept] == [name] and not report.left_out
    assert (f"  kept: tensor02/{name} is gone from tensor02 (purged from scratch?); merged from the copy "
            f"verified here at an earlier sync") in report.summary().splitlines()
    assert report.total_articles == ROWS - 10


def test_a_npy_checkpoint_is_kept_only_with_every_part_verified(tmp_path):
    downloads = tmp_path / "dl"
    generate_run(tmp_path / "names", rows=ROWS, dim=8, gpus_per_cluster=2, fmt="npy")
    parts = _gpu1(tmp_path / "names")
    _synced(downloads, {"tensor02": parts}, fmt="npy")
    articles = next(name for name in parts if name.endswith(".jsonl"))
    layout = DownloadLayout(downloads)
    layout.forget("tensor02", articles)  # its article file no sync verified: a hand-made one

    verified, unverified = sort_gone(layout, "tensor02", parts)
    assert not verified and unverified == parts  # the three go together
    with pytest.raises(MergeValidationError, match="no sync verified its copy here"):
        merge_checkpoints(downloads, tmp_path / "m.pkl")
    assert "3 file(s) here are no longer on the cluster and no sync verified them" in \
        gone_from_cluster_notice(layout, "tensor02", parts)

    state = FileState(remote_size=(downloads / "tensor02" / articles).stat().st_size, remote_mtime=0)
    layout.record_complete("tensor02", articles, state, file_sha256(downloads / "tensor02" / articles), "sha256")
    assert sorted(sort_gone(layout, "tensor02", parts)[0]) == parts
    report = merge_checkpoints(downloads, tmp_path / "m.pkl")
    assert [copy.path.name for copy in report.kept] == [name for name in parts if name.endswith(".npy")]


def test_a_copy_replaced_since_it_was_verified_is_not_a_verified_copy(tmp_path):
    downloads = tmp_path / "dl"
    generate_run(tmp_path / "names", rows=ROWS, dim=8, gpus_per_cluster=2)
    _synced(downloads, {"tensor02": _gpu1(tmp_path / "names")})
    [name] = _gpu1(downloads)
    path = downloads / "tensor02" / name
    path.write_bytes(path.read_bytes() + b"\0")  # another file than the one verified

    with pytest.raises(MergeValidationError, match="no sync verified its copy here"):
        merge_checkpoints(downloads, tmp_path / "m.pkl")


def test_a_copy_partly_overlapped_by_the_clusters_current_files_is_left_out_naming_why(tmp_path):
    downloads = tmp_path / "dl"
    generate_run(tmp_path / "names", rows=ROWS, dim=8, gpus_per_cluster=2)
    [old] = _gpu1(tmp_path / "names")
    _synced(downloads, {"tensor02": [old]})
    # The cluster re-splits GPU 1's piece [300, 400): so far only its first half is written.
    generate_run(tmp_path / "resplit", rows=ROWS, dim=8, gpus_per_cluster=2, files_per_gpu=2)
    first_half = sorted((tmp_path / "resplit" / "tensor02").glob("embeddings_gpu1_*"))[0]
    os.replace(first_half, downloads / "tensor02" / first_half.name)
    layout = DownloadLayout(downloads)
    layout.save_listing("tensor02", sorted({*layout.load_listing("tensor02"), first_half.name}))

    with pytest.raises(MergeValidationError) as raised:
        merge_checkpoints(downloads, tmp_path / "m.pkl")
    assert str(raised.value).endswith(
        f"indices 350..399 are only in {downloads / 'tensor02' / old}, which tensor02 no longer held at the last "
        f"sync: its verified copy here is not merged, because files tensor02 holds now cover its other rows "
        f"(re-split there?) and none holds these. Run `sync` again once the new files are all written, or add "
        f"--partial to merge without those rows.")

    report = merge_checkpoints(downloads, tmp_path / "m.pkl", partial=True)
    assert report.left_out == (downloads / "tensor02" / old,) and not report.kept
    assert report.missing_ranges == ((350, 400),)


def test_only_verified_copies_left_still_merge(tmp_path):
    downloads = tmp_path / "dl"
    generate_run(tmp_path / "names", rows=ROWS, dim=8, gpus_per_cluster=2)
    everything = {cluster: sorted(path.name for path in (tmp_path / "names" / cluster).iterdir())
                  for cluster in ("tensor01", "tensor02")}
    _synced(downloads, everything)  # every file purged on both clusters
    progress: list[tuple[int, int]] = []

    report = merge_checkpoints(downloads, tmp_path / "m.pkl", on_read=lambda done, total: progress.append((done, total)))
    assert len(report.kept) == 4 and report.total_articles == ROWS - 10
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len([line for line in report.summary().splitlines() if line.startswith("  kept: ")]) == 4


def test_when_copies_were_verified_is_said_in_local_time():
    at = time.mktime((2026, 11, 2, 14, 3, 30, 0, 0, -1))
    assert verified_when([at]) == "on 2026-11-02 14:03"
    assert verified_when([at, at + 86400]) == "from 2026-11-02 14:03 to 2026-11-03 14:03"
    assert verified_when([at, 0.0]) == verified_when([0.0]) == "at an earlier sync"
