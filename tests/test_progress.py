"""Bars on a terminal, plain lines elsewhere, errors only when quiet."""

import importlib
import io
import os
import re

import pytest

from async_embed_sync.progress import (
    PlainProgress,
    QuietProgress,
    TqdmProgress,
    choose_progress,
    format_bytes,
)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _feed(progress):
    # As the sync reports them: every file's full size is planned, a.pkl resumes at 1 MiB.
    progress.add_total(4 * 1024 * 1024)
    progress.file_started("tensor01", "a.pkl", 2 * 1024 * 1024, 1024 * 1024)
    progress.file_started("tensor02", "b.pkl", 2 * 1024 * 1024, 0)
    progress.advance("tensor01", "a.pkl", 1024 * 1024)
    progress.advance("tensor02", "b.pkl", 2 * 1024 * 1024)
    progress.file_finished("tensor01", "a.pkl", "downloaded")
    progress.file_finished("tensor02", "b.pkl", "failed")
    progress.note("a note")
    progress.error("an error")
    progress.close()


def test_choice_follows_the_stream():
    assert isinstance(choose_progress(False, FakeTerminal()), TqdmProgress)
    assert isinstance(choose_progress(False, io.StringIO()), PlainProgress)
    assert isinstance(choose_progress(True, FakeTerminal()), QuietProgress)


def test_plain_lines():
    stream = io.StringIO()
    _feed(PlainProgress(stream, interval=0))
    text = stream.getvalue()
    assert "tensor01: a.pkl 2.0 MiB (resuming at 1.0 MiB)" in text
    assert "failed" not in text  # said once, by the error, not again per file
    assert "total: 4.0 MiB of 4.0 MiB" in text  # the resumed MiB counts as done
    assert "a note" in text and "an error" in text
    # Lines end up in logs: each but the error (said as it is) carries a timestamp.
    lines = [line for line in text.splitlines() if line != "an error"]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), text


def test_tqdm_bars_show_total_and_files():
    stream = FakeTerminal()
    _feed(TqdmProgress(stream))
    text = stream.getvalue()
    assert "total" in text and "tensor01/a.pkl" in text
    # The resumed MiB counts as done: the total bar reaches 100 %, in MiB as the summary says.
    assert "100%" in text and "4.0/4.0 MiB" in text and "MiB/s" in text
    assert "a note" in text and "an error" in text and "failed" not in text


@pytest.mark.parametrize("kind", [TqdmProgress, PlainProgress])
def test_a_file_that_brings_more_than_its_listed_size_never_shows_more_than_100_percent(kind):
    # More bytes than the listing said (a file still growing): tqdm would drop its
    # total to None, and the bar format's {total:.1f} failed on every redraw.
    stream = FakeTerminal()
    progress = kind(stream) if kind is TqdmProgress else kind(stream, interval=0)
    progress.add_total(1024 * 1024)
    progress.file_started("tensor01", "a.pkl", 1024 * 1024, 0)
    for _ in range(3):
        progress.advance("tensor01", "a.pkl", 1024 * 1024)
    progress.file_finished("tensor01", "a.pkl", "failed")
    progress.close()
    text = stream.getvalue()
    if kind is TqdmProgress:
        percents = [int(p) for p in re.findall(r"(\d+)%", text)]
        assert percents and max(percents) <= 100 and "3.0/3.0 MiB" in text, text
    else:
        assert "total: 3.0 MiB of 3.0 MiB" in text, text


def test_a_file_planned_again_counts_once_at_its_latest_size():
    # --follow plans a file still being written at every poll; a later round fetches a changed one again.
    stream = io.StringIO()
    progress = PlainProgress(stream, interval=0)
    progress.file_planned("tensor01", "a.pkl", 1024 * 1024)
    progress.file_planned("tensor01", "b.pkl", 1024 * 1024)
    progress.file_planned("tensor01", "a.pkl", 3 * 1024 * 1024)
    assert progress.total == 4 * 1024 * 1024


def test_the_rate_is_about_what_this_run_fetched():
    stream = FakeTerminal()
    progress = TqdmProgress(stream)
    progress.add_total(100 * 1024 * 1024)
    progress.file_started("tensor01", "a.pkl", 100 * 1024 * 1024, 99 * 1024 * 1024)
    bar = progress._total_bar
    assert bar.n == 99 and bar.n - bar.initial == 0  # MiB; nothing fetched yet: no rate
    progress.advance("tensor01", "a.pkl", 1024 * 1024)
    progress.close()
    rates = re.findall(r"(-?[\d.]+)MiB/s", stream.getvalue())
    assert rates and all(float(rate) >= 0 for rate in rates), stream.getvalue()  # never negative after a resume


def test_labels_fit_an_80_column_terminal():
    stream = FakeTerminal()
    stream.columns = 80
    progress = TqdmProgress(stream)
    progress.add_total(10)
    progress.file_started("tensor01", "embeddings_gpu3_00187507_00250010.pkl", 10, 0)
    progress.advance("tensor01", "embeddings_gpu3_00187507_00250010.pkl", 5)
    label = next(iter(progress._file_bars.values())).desc
    assert len(label) <= 28 and label.startswith("tensor01/emb") and label.endswith("250010.pkl")
    progress.close()


def test_many_files_in_flight_get_eight_bars_and_the_total_counts_them_all():
    stream = FakeTerminal()  # no terminal size: 24 rows assumed
    progress = TqdmProgress(stream)
    names = [f"part{i:02d}.pkl" for i in range(30)]
    progress.add_total(30 * 1024 * 1024)
    for name in names:
        progress.file_started("tensor01", name, 1024 * 1024, 0)
    progress.advance("tensor01", "part20.pkl", 512 * 1024)  # a file without a bar still moves the total
    assert [key[1] for key in progress._file_bars] == names[:8]
    assert progress._total_bar.desc == "total (+22 in flight)" and progress._total_bar.n == 0.5
    assert {abs(bar.pos) for bar in progress._file_bars.values()} == set(range(1, 9))  # rows 1-8, under the total
    progress.file_finished("tensor01", "part03.pkl", "downloaded")
    # The oldest file waiting takes the freed row.
    assert ("tensor01", "part08.pkl") in progress._file_bars and abs(progress._file_bars[("tensor01", "part08.pkl")].pos) == 4
    for name in names[:19]:
        progress.file_finished("tensor01", name, "downloaded")
    bar = progress._file_bars[("tensor01", "part20.pkl")]
    assert bar.n == 0.5 and len(progress._file_bars) == 8  # shown where it stands
    assert progress._total_bar.desc == "total (+3 in flight)"
    for name in names[19:]:
        progress.file_finished("tensor01", name, "downloaded")
    assert progress._total_bar.desc == "total" and not progress._file_bars
    progress.close()


def test_every_cluster_gets_file_bars_when_rows_are_few():
    progress = TqdmProgress(FakeTerminal())  # 8 bars
    progress.add_total(20 * 1024 * 1024)
    for i in range(10):  # tensor01's listing came first: its files started first
        progress.file_started("tensor01", f"a{i}.pkl", 1024 * 1024, 0)
    for i in range(10):
        progress.file_started("tensor02", f"b{i}.pkl", 1024 * 1024, 0)
    assert len(progress._file_bars) == 8
    progress.file_finished("tensor01", "a0.pkl", "downloaded")
    progress.file_finished("tensor01", "a1.pkl", "downloaded")
    # The freed rows go to the cluster that had none, oldest file first.
    shown = [name for cluster, name in progress._file_bars if cluster == "tensor02"]
    assert shown == ["b0.pkl", "b1.pkl"]
    progress.close()


def test_steps_before_the_bytes_flow_are_shown():
    stream = io.StringIO()
    plain = PlainProgress(stream, interval=0)
    for done in range(1, 4):
        plain.step("merge: checkpoints read", done, 3)
    assert "merge: checkpoints read: 3 of 3" in stream.getvalue()
    terminal = FakeTerminal()
    bars = TqdmProgress(terminal)
    for done in range(1, 4):
        bars.step("merge: checkpoints read", done, 3)
    assert "merge: checkpoints read:   0%|" in terminal.getvalue() and "0/3 [00:00<?]" in terminal.getvalue()
    assert "it/s" not in terminal.getvalue()  # a count of checkpoints, not of tqdm's "it"


def test_quiet_shows_errors_only():
    stream = io.StringIO()
    _feed(QuietProgress(stream))
    assert stream.getvalue() == "an error\n"


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 ** 3) == "3.0 GiB"


def test_a_drop_mid_run_neither_counts_bytes_twice_nor_loses_them():
    # 10 MiB file: 6 MiB arrive, the link drops, the verified offset was 4 MiB: 2 MiB come again.
    MiB = 1024 * 1024
    for progress in (TqdmProgress(FakeTerminal()), PlainProgress(io.StringIO(), interval=0)):
        progress.add_total(10 * MiB)
        progress.file_started("tensor01", "a.pkl", 10 * MiB, 0)
        progress.advance("tensor01", "a.pkl", 6 * MiB)
        progress.file_finished("tensor01", "a.pkl", "failed")
        progress.file_started("tensor01", "a.pkl", 10 * MiB, 4 * MiB)
        progress.advance("tensor01", "a.pkl", 6 * MiB)
        if isinstance(progress, TqdmProgress):
            assert progress._total_bar.n == pytest.approx(progress._total_bar.total) == 10  # MiB
        else:
            assert progress.resumed + progress.done == 10 * MiB
        progress.close()


def test_the_sync_summary_says_rates_in_mib_per_second_within_80_columns():
    sync_module = importlib.import_module("async_embed_sync.transfer.sync")
    GiB = 1024 ** 3
    clusters = {
        "tensor01": sync_module.ClusterReport("tensor01", files=200, total_bytes=GiB, transferred=1190 * 1024 ** 2,
                                              seconds=1.0, method="sftp", verified_by={"sha256"}),  # 10 Gbit/s
        "tensor02": sync_module.ClusterReport("tensor02", files=1, total_bytes=1_835_008, transferred=859_000,
                                              seconds=1.0, method="exec", verified_by={"sha256"}),
    }
    lines = sync_module.SyncReport(clusters).summary().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert " 1190 MiB/s " in lines[1] and " 0.82 MiB/s " in lines[2], lines
    assert "KiB/s" not in "".join(lines)


def test_bars_keep_the_terminal_from_discarding_their_output_on_ctrl_c_and_give_it_back() -> None:
    """A terminal flushes the output not yet shown when Ctrl-C is typed: the cursor moves of a redraw
    can go, leaving the cursor on a file bar's row, where the total bar was then drawn again."""
    import termios

    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as stream:
            before = termios.tcgetattr(follower)[3]
            progress = TqdmProgress(stream)
            during = termios.tcgetattr(follower)[3]
            progress.close()
            after = termios.tcgetattr(follower)[3]
    finally:
        os.close(leader)
        os.close(follower)

    assert not before & termios.NOFLSH and during & termios.NOFLSH
    assert after == before


def test_the_terminal_gets_its_settings_back_when_the_last_bars_go() -> None:
    import termios

    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as stream:
            before = termios.tcgetattr(follower)[3]
            first, second = TqdmProgress(stream), TqdmProgress(stream)
            first.close()
            still = termios.tcgetattr(follower)[3]
            second.close()
            second.close()
            after = termios.tcgetattr(follower)[3]
    finally:
        os.close(leader)
        os.close(follower)

    assert still & termios.NOFLSH and after == before
