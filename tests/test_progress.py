"""Bars on a terminal, plain lines elsewhere, errors only when quiet."""

import io
import re

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
    progress.add_total(3 * 1024 * 1024)
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
    assert "tensor02: b.pkl failed" in text
    assert "total: 3.0 MiB of 3.0 MiB" in text
    assert "a note" in text and "an error" in text
    # Lines end up in logs: each but the error (said as it is) carries a timestamp.
    lines = [line for line in text.splitlines() if line != "an error"]
    assert lines and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", line) for line in lines), text


def test_tqdm_bars_show_total_and_files():
    stream = FakeTerminal()
    _feed(TqdmProgress(stream))
    text = stream.getvalue()
    assert "total" in text and "tensor01/a.pkl" in text
    assert "3.00M/3.00M" in text
    assert "a note" in text and "an error" in text


def test_quiet_shows_errors_only():
    stream = io.StringIO()
    _feed(QuietProgress(stream))
    assert stream.getvalue() == "an error\n"


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 ** 3) == "3.0 GiB"
