"""Nothing lost and nothing misleading: a typo in --clusters, init's total_rows, small files' bars, a report
on a path that is not there, the command named as typed, --json, and a library sync that raises."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tqdm
import tqdm.auto

from async_embed_sync import api, load, merge, sync, sync_async
from async_embed_sync.cli import main
from async_embed_sync.config import load_config
from async_embed_sync.errors import ConfigError, SyncFailedError
from async_embed_sync.progress import QuietProgress, TqdmProgress
from async_embed_sync.testing.synthetic import generate_run

ROOT = Path(__file__).resolve().parent.parent
TWO_CLUSTERS = {"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}, "tensor02": {"host": "h", "remote_dir": "/d"}}}


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


# ------------------------------------------------------------------ 1. a typo in --clusters


@pytest.mark.parametrize("argv", [["run", "--clusters", "tensor01", "tensr02"], ["--clusters", "tensor01 tensr02"],
                                  ["sync", "--clusters", "tensr02"], ["status", "--clusters", "tensr02"]],
                         ids=["run", "legacy", "sync", "status"])
def test_a_cluster_not_configured_is_a_usage_error_naming_the_flag_and_the_clusters(tmp_path, monkeypatch, capsys,
                                                                                    argv):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "credentials.json").write_text(json.dumps(TWO_CLUSTERS))
    assert main(argv, prog="async-embed-sync") == 2
    err = capsys.readouterr().err
    command = argv[0] if not argv[0].startswith("-") else "run"
    assert err.startswith(f"usage: async-embed-sync {command} "), err
    assert err.splitlines()[-1] == (f"async-embed-sync {command}: error: argument --clusters: unknown cluster(s) "
                                    f"tensr02; the clusters configured in credentials.json are: tensor01, tensor02")
    assert "Configuration error" not in err


def test_a_usage_error_raised_inside_a_handler_returns_2_from_main(monkeypatch, capsys):
    def handler(args):
        args.usage_error("raised by the handler")

    monkeypatch.setattr("async_embed_sync.cli._report", handler)
    assert main(["report", "x.pkl"]) == 2
    assert "report: error: raised by the handler" in capsys.readouterr().err


# ------------------------------------------------------------------ 2. init writes total_rows


def test_init_writes_total_rows_not_set_and_says_where_the_number_comes_from(tmp_path, capsys):
    path = tmp_path / "credentials.json"
    assert main(["init", "--config", str(path)], prog="async-embed-sync") == 0
    err = capsys.readouterr().err
    written = json.loads(path.read_text())
    assert "total_rows" in written and written["total_rows"] is None
    assert "end_index" in written["_total_rows"]  # the comment beside it
    assert "set total_rows to the rows of the whole run" in err and "end_index" in err
    assert err.rstrip().endswith("(null: not set); then check with: async-embed-sync status")
    # The packaged example and the one at the repository's top level are one text.
    assert (ROOT / "credentials.example.json").read_text() == \
        (ROOT / "async_embed_sync" / "credentials.example.json").read_text()


def test_total_rows_null_is_not_set_and_fields_starting_with_underscore_are_comments(tmp_path):
    path = tmp_path / "credentials.json"
    path.write_text(json.dumps({"_note": "a comment", "total_rows": None, "clusters": {
        "tensor01": {"host": "h", "remote_dir": "/d", "_why": "the first"}}}))
    config = load_config(path)
    assert config.total_rows is None and list(config.clusters) == ["tensor01"]
    path.write_text(json.dumps({"total_row": 5, **TWO_CLUSTERS}))  # a typo still is one
    with pytest.raises(ConfigError, match="unknown top-level field"):
        load_config(path)


# ------------------------------------------------------------------ 3. small files' bars


def _bar_lines(stream: io.StringIO) -> list[str]:
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stream.getvalue())
    return [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]


def test_a_small_file_s_bar_reads_in_kib_or_bytes_not_zero_mib():
    stream = FakeTerminal()
    progress = TqdmProgress(stream)
    sizes = {"a.json": 200, "b.pkl": 300 * 1024, "c.pkl": 5 * 1024 * 1024}
    progress.add_total(sum(sizes.values()))
    for name, size in sizes.items():
        progress.file_started("tensor01", name, size, size // 3)
    for name, size in sizes.items():
        progress.advance("tensor01", name, size - size // 3)
        progress.file_finished("tensor01", name, "downloaded")
    progress.close()
    lines = _bar_lines(stream)
    assert any(line.startswith("tensor01/a.json:") and "66/200 B" in line for line in lines), lines
    assert any(line.startswith("tensor01/b.pkl:") and "100.0/300.0 KiB" in line for line in lines), lines
    assert any(line.startswith("tensor01/c.pkl:") and "1.7/5.0 MiB" in line for line in lines), lines
    assert not any("0.0/0.0" in line for line in lines), lines  # the total bar's first draw neither


# ------------------------------------------------------------------ 4. report on a path that is not there


def test_report_on_a_missing_path_names_the_nearest_result_or_says_to_merge_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "merged.pkl"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Cannot report on merged.pkl: it does not exist. No merged result is beside it, "
                          "nor at embeddings/wikipedia_merged.pkl: run the merge first"), err
    generate_run(tmp_path / "dl", rows=60, dim=8, gpus_per_cluster=1)
    assert main(["merge", "--download-dir", "dl", "--quiet"]) == 0
    assert main(["report", "wikipedia_merged.pkl"]) == 1
    assert "Did you mean embeddings/wikipedia_merged.pkl?" in capsys.readouterr().err
    assert main(["report", "embeddings/wikipedia_merge.pkl"]) == 1  # a typo beside the result
    assert "Did you mean embeddings/wikipedia_merged.pkl?" in capsys.readouterr().err


# ------------------------------------------------------------------ 5. the command as it was typed


def test_the_missing_configuration_message_names_the_command_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("ASYNC_EMBED_SYNC_CONFIG", raising=False)
    for argv, typed in (([str(Path(sys.executable).parent / "async-embed-sync"), "run"], "async-embed-sync"),
                        ([sys.executable, "-m", "async_embed_sync", "sync"], "python -m async_embed_sync")):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 1
        assert f"Run `{typed} init` to write one" in done.stderr, done.stderr


# ------------------------------------------------------------------ 6. --json


def test_merge_json_is_one_document_on_stdout_on_success_and_on_failure(tmp_path, capsys):
    download_dir = tmp_path / "dl"
    generate_run(download_dir, rows=600, dim=16, gpus_per_cluster=2)
    output = tmp_path / "merged"
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(output), "--json"]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["ok"] is True and document["exit_code"] == 0 and document["error"] is None
    assert document["merge"]["total_articles"] == 590 and document["merge"]["output"] == str(output)
    assert "Merged 590 articles" not in err and "merge: 600 of 600 rows" in err  # no human summary; the lines stay
    assert main(["merge", "--download-dir", str(download_dir), "--output", str(tmp_path / "m.pkl"),
                 "--expect-articles", "7", "--json", "--quiet"]) == 1
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["ok"] is False and document["exit_code"] == 1 and "merge" not in document
    assert "7 articles were expected" in document["error"]["message"] and "7 articles were expected" in err


def test_run_and_sync_json_carry_every_cluster_and_the_error(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    generate_run(remote, rows=400, dim=8, gpus_per_cluster=2)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01")),
                                     "tensor02": openssh.cluster_entry(str(remote / "missing"))})
    common = ["--config", str(config), "--download-dir", str(tmp_path / "dl"), "--json"]
    assert main(["sync", *common]) == 1
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["command"] == "sync" and document["exit_code"] == 1
    assert document["sync"]["clusters"]["tensor01"]["ok"] is True
    assert document["sync"]["clusters"]["tensor01"]["downloaded"] == 2
    assert "cannot be listed" in document["sync"]["clusters"]["tensor02"]["failures"][0]
    assert document["error"]["type"] == "SyncFailedError" and document["error"]["rerun_fixes"] is False
    assert not any(line.startswith("cluster ") for line in err.splitlines()), err  # no summary table

    (remote / "tensor02").rename(remote / "missing")
    output = tmp_path / "merged.pkl"
    assert main(["run", *common, "--output", str(output), "--quiet"]) == 0
    out, err = capsys.readouterr()
    document = json.loads(out)
    assert document["ok"] is True and document["sync"]["ok"] is True
    assert document["merge"]["total_articles"] == 390 == load(output)["total_articles"]
    assert err == ""


# ------------------------------------------------------------------ 7. the library's sync raises


def test_a_library_sync_raises_when_a_cluster_failed_with_the_report_attached(openssh, tmp_path, write_config):
    remote = tmp_path / "remote"
    generate_run(remote, rows=120, dim=8, gpus_per_cluster=1)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01")),
                                     "tensor02": openssh.cluster_entry(str(remote / "missing"))})
    with pytest.raises(SyncFailedError) as caught:
        sync(config, download_dir=tmp_path / "dl", progress=QuietProgress())
    report = caught.value.report
    assert report.clusters["tensor01"].ok and report.clusters["tensor01"].downloaded == 1
    assert not report.clusters["tensor02"].ok
    with pytest.raises(SyncFailedError):
        report.raise_for_failures()  # still there, and still raising

    with pytest.raises(SyncFailedError) as caught:
        asyncio.run(sync_async(config, download_dir=tmp_path / "dl", progress=QuietProgress()))
    assert caught.value.report.clusters["tensor01"].skipped == 1


def test_progress_takes_a_tqdm_class(openssh, tmp_path, write_config, capsys):
    remote = tmp_path / "remote"
    generate_run(remote, rows=120, dim=8, gpus_per_cluster=1)
    config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote / "tensor01"))})
    drawn = []

    class Bars(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            drawn.append(kwargs.get("desc"))
            super().__init__(*args, **kwargs)

    report = sync(config, download_dir=tmp_path / "dl", progress=Bars)
    assert report.ok and "total" in drawn and any(desc and desc.startswith("tensor01/") for desc in drawn), drawn
    drawn.clear()
    merged = merge(tmp_path / "dl", tmp_path / "m.pkl", progress=Bars, shard_rows=50)  # merge's keywords typed
    assert merged.total_articles == 60 and "merge" in drawn, drawn  # tensor01 holds rows 0..59
    with pytest.raises(TypeError, match="shard_row"):
        merge(tmp_path / "dl", tmp_path / "m2.pkl", shard_row=50)  # a misspelt keyword is not swallowed


def test_in_a_notebook_the_default_is_tqdm_auto_bars(monkeypatch):
    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or type(sys)("ipykernel"))
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a notebook's stderr is no terminal
    progress = api._default_progress()
    assert isinstance(progress, TqdmProgress) and progress._bar_class is tqdm.auto.tqdm
    monkeypatch.delitem(sys.modules, "ipykernel")
    assert isinstance(api._default_progress(), QuietProgress)  # a log, a service: no bars
