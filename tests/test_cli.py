"""``main(argv)`` for every command and its error paths, called directly."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme_blocks import commands as readme_commands

from async_embed_sync import load
from async_embed_sync.cli import build_parser, main
from async_embed_sync.layout import DownloadLayout, FileState
from async_embed_sync.testing.synthetic import generate_run


def test_help_and_usage_errors(capsys):
    assert main(["--help"], prog="python -m async_embed_sync") == 0
    assert "examples:" in capsys.readouterr().out
    for command in ("run", "sync", "merge", "status", "demo", "init"):
        assert main([command, "-h"], prog="python -m async_embed_sync") == 0
        help_text = capsys.readouterr().out
        assert f"usage: python -m async_embed_sync {command}" in help_text
        assert all(len(line) <= 80 for line in help_text.splitlines()), help_text  # an 80-column terminal
        # Its own examples, not every command's.
        examples = [line.split()[3] for line in help_text.split("examples:")[1].splitlines()
                    if line.startswith("  python -m")]
        assert examples and set(examples) <= {command, "--sync-only"}, help_text
    for nonsense in (["sync", "--max-parallel", "0"], ["sync", "--retries", "-1"], ["sync", "--timeout", "0"],
                     ["sync", "--timeout", "nan"], ["sync", "--timeout", "inf"], ["merge", "--expect-articles", "-5"], ["sync", "--retries", "x"]):
        assert main(nonsense) == 2, nonsense
        assert "error: argument" in capsys.readouterr().err
    assert main(["run", "--sync-only", "--merge-only"]) == 2
    assert main(["merge", "--dtype", "int8"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--rows", "2010"]) == 0
    captured = capsys.readouterr()
    err, out = captured.err, captured.out
    result = load(tmp_path / "demo" / "wikipedia_merged.pkl")
    assert result["embeddings"].shape == (2000, 768)
    assert all(a.get("kind", "article") == "article" for a in result["articles"])
    assert "tensor01" in err and "tensor02" in err and "Merged 2,000 articles" in err
    assert "from async_embed_sync import load" in out
    assert f"the credentials.json it left in {tmp_path / 'demo'} points at servers that are gone now" in out.replace("\n", " ")


def test_demo_resumes_after_drops(tmp_path, capsys):
    assert main(["demo", "--dir", str(tmp_path / "demo"), "--rows", "4010",
                 "--drop-after", "1000000", "--max-parallel", "2"]) == 0
    err = capsys.readouterr().err
    assert "reconnecting" in err
    header, *summary = err[err.index("\ncluster ") + 1:].splitlines()[:3]
    assert len(header) <= 80 and all(len(line) <= 80 for line in summary), summary  # an 80-column terminal
    assert sum(int(line.split()[-3]) for line in summary) >= 1, summary  # the resumed column
    with open(tmp_path / "demo" / "wikipedia_merged.pkl", "rb") as f:
        assert pickle.load(f)["total_articles"] == 4000


def _local_run(tmp_path: Path, **options) -> Path:
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=600, dim=16, gpus_per_cluster=2, **options)
    return download_dir


@pytest.mark.parametrize("argv_head", [["run", "--merge-only"], ["merge"], ["--merge-only"]])
def test_merge_paths_including_legacy_flags(tmp_path, argv_head):
    download_dir = _local_run(tmp_path)
    output = tmp_path / "out" / "merged.pkl"
    assert main([*argv_head, "--download-dir", str(download_dir), "--output", str(output),
                 "--expect-articles", "590", "--quiet"]) == 0
    assert load(output)["embeddings"].shape == (590, 16)


@pytest.mark.parametrize("name", ["x.pickle", "X.PKL", "y.Pickle"])
def test_pickle_suffixes_in_any_case_write_the_legacy_pickle(tmp_path, name):
    download_dir = _local_run(tmp_path)
    output = tmp_path / name
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(output), "--quiet"]) == 0
    assert output.is_file()
    with open(output, "rb") as f:
        assert pickle.load(f)["embeddings"].shape == (590, 16)
    assert load(output)["total_articles"] == 590


def test_bundle_output_and_float16(tmp_path):
    download_dir = _local_run(tmp_path, fmt="mixed")
    output = tmp_path / "bundle"
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(output),
                 "--dtype", "float16", "--quiet"]) == 0
    result = load(output)
    assert str(result["embeddings"].dtype) == "float16" and len(result["articles"]) == 590


@pytest.mark.parametrize(("articles_format", "suffix"), [("jsonl", "jsonl"), ("parquet", "parquet"),
                                                       ("parquet-embeddings", "parquet")])
def test_bundle_articles_format_and_shard_rows_flags(tmp_path, articles_format, suffix):
    download_dir = _local_run(tmp_path, fmt="npy")
    bundle, legacy = tmp_path / "bundle", tmp_path / "legacy.pkl"
    for output, extra in ((bundle, ["--articles-format", articles_format, "--shard-rows", "200"]), (legacy, [])):
        assert main(["merge", "--download-dir", str(download_dir), "--output", str(output),
                     "--quiet", *extra]) == 0
    assert sorted(os.listdir(bundle / "metadata")) == [f"part-0000{i}.{suffix}" for i in range(3)]  # 590 rows
    assert load(bundle)["articles"] == load(legacy)["articles"]


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
def test_shard_rows_must_be_a_positive_whole_number(value, capsys):
    assert main(["merge", "--shard-rows", value]) == 2
    assert "error: argument --shard-rows" in capsys.readouterr().err


def test_merge_error_is_one_paragraph_and_leaves_nothing(tmp_path, capsys):
    download_dir = _local_run(tmp_path)
    victim = sorted((download_dir / "tensor01").glob("*.pkl"))[1]
    victim.unlink()  # a GPU's piece is missing: a gap
    output = tmp_path / "merged.pkl"
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(output)]) == 1
    err = capsys.readouterr().err
    # Progress lines (timestamped, stderr not a terminal), then one paragraph.
    *progress_lines, error = err.splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d merge", line) for line in progress_lines), err
    assert error.startswith("error: ") and "150..299 are missing" in error and "Traceback" not in err
    assert not output.exists()
    assert main(["merge", "--download-dir", str(download_dir), "--expect-articles", "7",
                 "--output", str(output)]) == 1


def test_config_errors_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sync"]) == 1
    assert "No configuration found" in capsys.readouterr().err
    (tmp_path / "credentials.json").write_text('{"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}}')
    assert main(["status", "--clusters", "tensor09"]) == 2  # a usage error: tests/test_nothing_misleading.py
    assert "argument --clusters: unknown cluster(s) tensor09" in capsys.readouterr().err


def test_failed_sync_does_not_merge(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    generate_run(remote, rows=400, dim=8, gpus_per_cluster=2)
    config = write_config(tmp_path, {
        "tensor01": openssh.cluster_entry(str(remote / "tensor01")),
        "tensor02": openssh.cluster_entry(str(remote / "missing")),
    })
    output = tmp_path / "merged.pkl"
    assert main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(output), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "did not finish. tensor02: remote_dir cannot be listed (fix this first" in err
    assert "once the errors above are fixed as they say, the same command resumes" in err
    assert not output.exists()
    # With the missing cluster fixed, the same command finishes (resuming tensor01).
    (remote / "tensor02").rename(remote / "missing")
    assert main(["run", "--config", str(config), "--download-dir", str(tmp_path / "dl"),
                 "--output", str(output), "--quiet"]) == 0
    assert load(output)["total_articles"] == 390


def test_status_counts_complete_missing_and_changed(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("a.pkl", "b.pkl", "c.pkl"):
        (remote / name).write_bytes(os.urandom(100_000))
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote), pattern="a.pkl")})
    download_dir = tmp_path / "dl"
    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet"]) == 0
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    (remote / "a.pkl").write_bytes(os.urandom(100_001))
    capsys.readouterr()
    assert main(["status", "--config", str(config), "--download-dir", str(download_dir)]) == 0
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:3] == ["cluster", "remote", "size"]
    columns = line.split()
    assert columns[0] == "tensor01" and columns[1] == "3"
    assert columns[-3:] == ["1", "2", "0"]  # a.pkl changed remotely; b and c missing; none local only
    assert not (download_dir / "tensor01" / "b.pkl").exists()


def test_status_and_sync_name_files_the_cluster_no_longer_holds(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in ("a.pkl", "b.pkl"):
        (remote / name).write_bytes(os.urandom(10_000))
        an_hour_ago = time.time() - 3600  # long written: not "still being written" on the cluster
        os.utime(remote / name, (an_hour_ago, an_hour_ago))
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    download_dir = tmp_path / "dl"
    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet"]) == 0
    (remote / "b.pkl").unlink()  # re-split or cleaned up on the cluster since
    capsys.readouterr()

    assert main(["status", "--config", str(config), "--download-dir", str(download_dir)]) == 0
    out = capsys.readouterr().out
    header, line = out.splitlines()[:2]
    assert header.endswith(" only here") and line.split()[-1] == "1" and len(header) <= 80
    # b.pkl was verified by the sync: kept here, and the merge takes it (tests/test_purged_checkpoints.py).
    assert "tensor01: 1 file(s) kept here, gone from the cluster (purged from scratch?): b.pkl, verified here on" in out

    assert main(["sync", "--config", str(config), "--download-dir", str(download_dir)]) == 0
    err = capsys.readouterr().err
    assert "b.pkl" in next(line for line in err.splitlines() if line.startswith("tensor01: 1 file(s) "))
    assert (download_dir / "tensor01" / "b.pkl").is_file()  # kept: never deleted


def test_readme_command_lines_are_valid_and_the_demo_runs(tmp_path, monkeypatch):
    commands = readme_commands()
    assert any(c.endswith("async_embed_sync demo") for c in commands)
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[3:]
        if argv and argv[0].startswith("-"):
            argv = ["run", *argv]
        parser.parse_args(argv)  # every flag the README shows exists
    monkeypatch.chdir(tmp_path)
    # The setup line's demo, as written (small rows to keep the suite quick).
    demo = next(c for c in commands if c.endswith("async_embed_sync demo"))
    assert main([*shlex.split(demo)[3:], "--rows", "1010", "--quiet"]) == 0
    assert load(tmp_path / "async_embed_sync_demo" / "wikipedia_merged.pkl")["total_articles"] == 1000


def test_status_never_shows_a_partial_at_100_percent(openssh, tmp_path, write_config, capsys):
    # All bytes here, not yet verified (a kill between the last fsync and the rename).
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(os.urandom(200_000))
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote))})
    layout = DownloadLayout(tmp_path / "dl")
    layout.prepare("tensor01")
    stat = (remote / "a.pkl").stat()
    layout.partial_path("tensor01", "a.pkl").write_bytes((remote / "a.pkl").read_bytes())
    layout.save_state("tensor01", "a.pkl", FileState(remote_size=stat.st_size, remote_mtime=int(stat.st_mtime),
                                                    verified_offset=stat.st_size))
    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert "(99 %)" in line and "100 %" not in line


def test_no_arguments_mean_run_and_the_name_typed_is_shown(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 1  # `run`, as the legacy script: here it finds no configuration
    assert "No configuration found" in capsys.readouterr().err
    console_script = subprocess.run([str(Path(sys.executable).parent / "async-embed-sync"), "--version"],
                                    capture_output=True, text=True, timeout=60)
    assert console_script.stdout.startswith("async-embed-sync ")
    module = subprocess.run([sys.executable, "-m", "async_embed_sync", "merge", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert module.stdout.startswith("usage: python -m async_embed_sync merge")


def test_status_warns_about_a_readable_password_as_sync_does(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "a.pkl").write_bytes(b"x" * 100)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote), password="not-used")})
    config.chmod(0o644)
    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 0
    err = capsys.readouterr().err
    assert f"Warning: {config} holds a password and is readable by group or others (mode 0644)" in err
    assert "not-used" not in err


def _custom_sigterm_handler(signum, frame):
    raise AssertionError("a SIGTERM reached the test's own handler")


@pytest.mark.parametrize("sigterm_handler", [signal.SIG_DFL, _custom_sigterm_handler], ids=["default", "custom"])
def test_main_leaves_the_signal_handlers_as_it_found_them(openssh, tmp_path, write_config, sigterm_handler):
    """A library caller or a test calling main(argv) is not left with the CLI's
    handlers: after a sync (an event loop), a merge, a failed merge, a usage error."""
    remote = tmp_path / "remote"
    generate_run(remote, rows=400, dim=8, gpus_per_cluster=2)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01"))})
    download_dir = tmp_path / "dl"
    commands = [
        (["sync", "--config", str(config), "--download-dir", str(download_dir), "--quiet"], 0),
        (["merge", "--download-dir", str(download_dir), "--output", str(tmp_path / "m.pkl"), "--quiet"], 0),
        (["merge", "--download-dir", str(download_dir), "--output", str(tmp_path / "m"), "--expect-articles", "1"], 1),
        (["merge", "--dtype", "int8"], 2),
    ]
    previous = signal.signal(signal.SIGTERM, sigterm_handler)
    try:
        for argv, code in commands:
            found = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
            assert main(argv) == code
            assert {signum: signal.getsignal(signum) for signum in found} == found, argv
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_status_says_when_remote_dir_holds_no_checkpoints_as_sync_does(openssh, tmp_path, write_config, capsys):
    (tmp_path / "data" / "checkpoints").mkdir(parents=True)  # remote_dir one level too high
    (tmp_path / "data" / "checkpoints" / "a.pkl").write_bytes(b"x")
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(tmp_path / "data"))})
    assert main(["status", "--config", str(config), "--download-dir", str(tmp_path / "dl")]) == 1
    out, err = capsys.readouterr()
    assert "tensor01 error (see below)" in out and "no checkpoint" not in out  # the table on stdout, errors on stderr
    assert f"error: Cluster 'tensor01': no checkpoint files matching *.pkl, *.npy, *.json, *.jsonl in {tmp_path / 'data'}." in err, err


def test_settle_takes_zero_written_any_way_and_refuses_what_is_no_window():
    parser = build_parser()
    for zero in ("0", "0.0", "0.00", "00"):
        assert parser.parse_args(["sync", "--settle", zero]).settle == 0.0
    for nonsense in ("-1", "nan", "inf", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["sync", "--settle", nonsense])
