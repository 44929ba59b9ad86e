"""What the user sees while the tool works: bars, plain lines, or silence.

The sync and merge report events to a ``Progress``; nothing else prints
progress. ``choose_progress`` picks tqdm bars for a terminal, plain log
lines otherwise (CI logs, ``| tee``), and ``QuietProgress`` for ``--quiet``,
which shows errors only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from tqdm import tqdm


class Progress:
    """The events; the base class shows nothing but errors."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self._planned: dict[tuple[str, str], int] = {}

    def add_total(self, nbytes: int) -> None:
        """``nbytes`` more are to be transferred (a cluster was planned)."""

    def file_planned(self, cluster: str, name: str, size: int) -> None:
        """The file is to be fetched, ``size`` bytes in all. Planned again (a later round or
        poll of the same run), it counts at its new size, once."""
        before = self._planned.get((cluster, name), 0)
        self._planned[(cluster, name)] = size
        self.add_total(size - before)

    def file_started(self, cluster: str, name: str, size: int, offset: int) -> None:
        """A file's transfer starts, at ``offset`` when it resumes."""

    def advance(self, cluster: str, name: str, nbytes: int) -> None:
        """``nbytes`` more of the file arrived."""

    def file_finished(self, cluster: str, name: str, outcome: str) -> None:
        """``outcome``: downloaded, skipped or failed."""

    def rows_merged(self, done: int, total: int) -> None:
        """The merge has copied ``done`` of ``total`` rows."""

    def step(self, what: str, done: int, total: int) -> None:
        """``done`` of ``total`` steps of a phase before the bytes or rows flow
        (checkpoints read by the merge, files written by the demo)."""

    def note(self, text: str) -> None:
        """A line worth showing when not quiet (reconnects, summaries)."""

    def error(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        """Remove bars; called once at the end."""


class _Positions:
    """Where each file stands, so that the total is the sum of the positions:
    a resumed file starts at its verified offset (done before this run, or
    before a drop in this run: counted once), and bytes fetched again after a
    drop are not counted twice."""

    def __init__(self) -> None:
        self._at: dict[tuple[str, str], int] = {}

    def start(self, cluster: str, name: str, offset: int) -> int:
        """The file (re)starts at ``offset``: how far the total moves (negative: bytes to fetch again)."""
        moved = offset - self._at.get((cluster, name), 0)
        self._at[(cluster, name)] = offset
        return moved

    def advance(self, cluster: str, name: str, nbytes: int) -> None:
        self._at[(cluster, name)] = self._at.get((cluster, name), 0) + nbytes

    def at(self, cluster: str, name: str) -> int:
        return self._at.get((cluster, name), 0)


class QuietProgress(Progress):
    pass


class PlainProgress(Progress):
    """One line per event, and a total line at most every ``interval`` s."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0):
        super().__init__(stream)
        self.interval = interval
        self.total = 0
        self.done = 0
        self.resumed = 0  # where files started, not fetched now: done, but not in the rate
        self._positions = _Positions()
        self.started = time.monotonic()
        self._last_line = 0.0

    def _line(self, text: str) -> None:
        # Timestamped: these lines end up in logs (CI, batch jobs, | tee).
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", file=self.stream, flush=True)

    def add_total(self, nbytes: int) -> None:
        self.total += nbytes

    def file_started(self, cluster: str, name: str, size: int, offset: int) -> None:
        resumed = f" (resuming at {format_bytes(offset)})" if offset else ""
        self.resumed += self._positions.start(cluster, name, offset)
        self._line(f"{cluster}: {name} {format_bytes(size)}{resumed}")

    def advance(self, cluster: str, name: str, nbytes: int) -> None:
        self.done += nbytes
        self._positions.advance(cluster, name, nbytes)
        now = time.monotonic()
        if now - self._last_line >= self.interval:
            self._last_line = now
            rate = self.done / max(now - self.started, 1e-9)
            so_far = self.resumed + self.done
            self._line(f"total: {format_bytes(so_far)} of {format_bytes(max(self.total, so_far))}"
                       f" at {format_rate(rate)}")

    def file_finished(self, cluster: str, name: str, outcome: str) -> None:
        if outcome != "failed":  # a failure is said once, by its error or the cluster's note
            self._line(f"{cluster}: {name} {outcome}")

    def rows_merged(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last_line >= self.interval:
            self._last_line = now
            self._line(f"merge: {done:,} of {total:,} rows")

    def step(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self._last_line >= self.interval:
            self._last_line = now
            self._line(f"{what}: {done:,} of {total:,}")

    def note(self, text: str) -> None:
        self._line(text)


class TqdmProgress(Progress):
    """A total bar (bytes, rate, ETA) above a bar per file in flight (as many
    as the terminal has rows for, 8 at most); a rows bar for the merge.

    ``bar_class``: the tqdm class that draws them (``tqdm.auto.tqdm`` in a
    notebook); by default ``tqdm.tqdm``, sized to the terminal. A class of
    one's own sizes its bars itself."""

    def __init__(self, stream: TextIO | None = None, bar_class: type | None = None):
        super().__init__(stream)
        self._bar_class = bar_class
        self._restore_terminal = _keep_output_on_interrupt(self.stream) if bar_class is None else _nothing
        self._total_bar: tqdm | None = None
        self._file_bars: dict[tuple[str, str], tqdm] = {}
        self._unshown: dict[tuple[str, str], int] = {}  # files in flight without a bar: their sizes
        self._merge_bar: tqdm | None = None
        self._step_bars: dict[str, tqdm] = {}
        self._positions = _Positions()
        self._free_positions: list[int] = []
        self._next_position = 1

    def _bar(self, **options) -> tqdm:
        if self._bar_class is not None:
            return self._bar_class(file=self.stream, **options)
        from tqdm import (
            tqdm,  # only a terminal needs it; the import costs start-up time
        )

        return tqdm(file=self.stream, ncols=self._bar_columns(), **options)

    def _resize(self, bar: tqdm) -> None:
        if self._bar_class is None:  # the bars live on: they follow a resize
            bar.ncols = self._bar_columns()

    def _terminal_size(self) -> tuple[int, int]:
        try:
            size = os.get_terminal_size(self.stream.fileno())
        except (AttributeError, OSError, ValueError):
            return _ASSUMED_TERMINAL_SIZE
        return size.columns, size.lines

    def _bar_columns(self) -> int:
        # Two short of the width: the terminal echoes Ctrl-C as "^C" after a
        # bar, and a full-width bar would wrap it onto the next row, where the
        # bar was then drawn again and the closing line glued to the "C".
        return max(20, self._terminal_size()[0] - 2)

    def _bytes_bar(self, unit: str = "MiB", **options) -> tqdm:
        # Counted in MiB (a file under 1 MiB in KiB, under 1 KiB in bytes: not "0.0/0.0 MiB"),
        # not scaled by tqdm: its unit_scale leaves `initial` unscaled, and a resumed bar's rate
        # came out negative.
        bar = self._bar(unit=unit, bar_format=_BYTES_BAR_FORMAT.format(
            decimals=0 if unit == "B" else 1, unit=unit), **options)
        bar.bytes_per_unit = _UNITS[unit]
        return bar

    def add_total(self, nbytes: int) -> None:
        if self._total_bar is None:  # drawn at once at its first total: never "0.0/0.0 MiB" first
            self._total_bar = self._bytes_bar(total=nbytes / _MiB, desc="total", position=0)
            return
        self._total_bar.total += nbytes / self._total_bar.bytes_per_unit
        self._total_bar.refresh()

    def file_started(self, cluster: str, name: str, size: int, offset: int) -> None:
        moved = self._positions.start(cluster, name, offset)
        if moved and self._total_bar is not None:
            # Resumed bytes are done, but not part of this run's rate or ETA:
            # moved past as if they had been there from the start.
            self._total_bar.n += moved / _MiB
            self._total_bar.initial += moved / _MiB
            self._total_bar.last_print_n += moved / _MiB
            self._total_bar.refresh()
        self._unshown[(cluster, name)] = size
        self._show_waiting_files()

    def _show_waiting_files(self) -> None:
        """Give files in flight a bar while rows are free: the oldest file of
        the cluster with the fewest bars, so that every cluster is seen.

        Bars past the terminal's last row scroll it, and every refresh then
        draws the whole stack again below the last: so at most
        ``_MAX_FILE_BARS``, fewer on a short terminal, and the total bar
        (which counts every file) says how many more are in flight."""
        rows = self._file_bar_rows()
        while self._unshown and len(self._file_bars) < rows:
            shown = Counter(cluster for cluster, _ in self._file_bars)
            cluster, name = min(self._unshown, key=lambda key: shown[key[0]])  # ties: the oldest
            size = self._unshown.pop((cluster, name))
            if self._free_positions:
                position = self._free_positions.pop(0)
            else:
                position, self._next_position = self._next_position, self._next_position + 1
            unit = _unit_for(size)
            self._file_bars[(cluster, name)] = self._bytes_bar(
                unit, total=size / _UNITS[unit], initial=self._positions.at(cluster, name) / _UNITS[unit],
                desc=_short(f"{cluster}/{name}"), position=position, leave=False)
        if self._total_bar is not None:
            self._resize(self._total_bar)
            desc = f"total (+{len(self._unshown)} in flight)" if self._unshown else "total"
            if self._total_bar.desc != desc:
                self._total_bar.set_description_str(desc)

    def _file_bar_rows(self) -> int:
        # The total bar, a note and the cursor's row stay free.
        return max(1, min(_MAX_FILE_BARS, self._terminal_size()[1] - 3))

    def advance(self, cluster: str, name: str, nbytes: int) -> None:
        self._positions.advance(cluster, name, nbytes)
        for bar in (self._total_bar, self._file_bars.get((cluster, name))):
            if bar is not None:
                _update_within_total(bar, nbytes / bar.bytes_per_unit)

    def file_finished(self, cluster: str, name: str, outcome: str) -> None:
        self._unshown.pop((cluster, name), None)
        bar = self._file_bars.pop((cluster, name), None)
        if bar is not None:
            self._free_positions.append(abs(bar.pos))
            self._free_positions.sort()
            bar.close()
        self._show_waiting_files()

    def rows_merged(self, done: int, total: int) -> None:
        if self._merge_bar is None:
            self._merge_bar = self._bar(total=total, unit="rows", unit_scale=True, desc="merge")
        self._resize(self._merge_bar)
        self._merge_bar.update(done - self._merge_bar.n)

    def step(self, what: str, done: int, total: int) -> None:
        bar = self._step_bars.get(what)
        if bar is None:
            bar = self._step_bars[what] = self._bar(total=total, desc=what, leave=False,
                                                    bar_format=_STEP_BAR_FORMAT)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._step_bars[what]

    def note(self, text: str) -> None:
        if self._bar_class is not None:
            self._bar_class.write(text, file=self.stream)
            return
        from tqdm import tqdm

        tqdm.write(text, file=self.stream)

    def error(self, text: str) -> None:
        # Above the bars, as a note: printed plainly, it would land inside a bar's row.
        self.note(text)

    def close(self) -> None:
        bars = [*self._file_bars.values(), *self._step_bars.values(), self._total_bar, self._merge_bar]
        for bar in bars:
            if bar is not None:
                bar.close()
        self._file_bars.clear()
        self._unshown.clear()
        self._step_bars.clear()
        self._total_bar = self._merge_bar = None
        self._restore_terminal()
        self._restore_terminal = _nothing


def _nothing() -> None:
    pass


def _update_within_total(bar: tqdm, amount: float) -> None:
    """``bar.update(amount)``, the total raised first if the count would pass it.

    A file can hold more than its listing said (it grew while it was
    written); tqdm then drops ``total`` to None, and a bar format that
    prints ``{total:.1f}`` fails on every redraw. The bar stays at or below
    100 % instead."""
    if bar.total is not None and bar.n + amount > bar.total:
        bar.total = bar.n + amount
    bar.update(amount)


def _keep_output_on_interrupt(stream: TextIO) -> Callable[[], None]:
    """Set the terminal's NOFLSH while bars are drawn; how to let go of it.

    By default a terminal discards the output not yet shown when Ctrl-C
    is typed. That can be the cursor moves of a bar's redraw: the cursor is
    then left on a file bar's row, and the total bar is drawn again there.
    The terminal gets its settings back when the last holder lets go, or
    when the process exits, whichever comes first.
    """
    try:
        import termios

        fd = stream.fileno()
        before = termios.tcgetattr(fd)
    except (ImportError, AttributeError, OSError, ValueError):
        return _nothing
    if fd not in _NOFLSH_HELD:
        if before[3] & termios.NOFLSH:
            return _nothing  # the user's own setting: nothing to set, nothing to give back
        after = list(before)
        after[3] |= termios.NOFLSH
        try:
            termios.tcsetattr(fd, termios.TCSANOW, after)
        except (OSError, termios.error):
            return _nothing
        _NOFLSH_HELD[fd] = [before, 0]
        atexit.register(_give_back, fd)
    _NOFLSH_HELD[fd][1] += 1
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            _NOFLSH_HELD[fd][1] -= 1
            if not _NOFLSH_HELD[fd][1]:
                _give_back(fd)

    return release


# A terminal's settings before the bars set NOFLSH, and how many bars' owners hold it.
_NOFLSH_HELD: dict[int, list] = {}


def _give_back(fd: int) -> None:
    import termios

    held = _NOFLSH_HELD.pop(fd, None)
    if held is not None:
        with contextlib.suppress(OSError, termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, held[0])


# File bars at most, however many files are in flight (--max-parallel is 128 by default).
_MAX_FILE_BARS = 8
_ASSUMED_TERMINAL_SIZE = (80, 24)  # columns, rows: a stream without a terminal size
# A file bar's label, so that an 80-column terminal keeps the counts and the ETA.
_LABEL_CHARS = 28
_MiB = 1024 * 1024
_UNITS = {"B": 1, "KiB": 1024, "MiB": _MiB}


def _unit_for(size: int) -> str:
    """A file bar's unit: one its size reads in with a digit that is not 0 ("12.0/180.5 KiB")."""
    return "B" if size < 1024 else "KiB" if size < _MiB else "MiB"


# Amounts and rates in MiB, as the summary says them ("12.3/135.0 MiB",
# "2.85MiB/s"): tqdm's own scaling mixes k and M, and turns a slow rate into s/MiB.
# A step counts things of its own kind (checkpoints written, read): no "it/s".
_STEP_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"
# Filled in with the bar's unit (MiB; KiB or B for a small file) and its decimals, then by tqdm.
_BYTES_BAR_FORMAT = ("{{desc}}: {{percentage:3.0f}}%|{{bar}}| {{n:.{decimals}f}}/{{total:.{decimals}f}} {unit} "
                     "[{{elapsed}}<{{remaining}}, {{rate_noinv_fmt}}]")


def _short(label: str) -> str:
    if len(label) <= _LABEL_CHARS:
        return label
    keep = _LABEL_CHARS - 1
    return f"{label[:keep // 2]}…{label[-(keep - keep // 2):]}"


def choose_progress(quiet: bool, stream: TextIO | None = None) -> Progress:
    stream = stream if stream is not None else sys.stderr
    if quiet:
        return QuietProgress(stream)
    if stream.isatty():
        return TqdmProgress(stream)
    return PlainProgress(stream)


def format_bytes(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            break
    return f"{n:.1f} {unit}"


def format_rate(bytes_per_second: float) -> str:
    """Always in MiB/s, as the bars say it; at most 10 characters below 100 GiB/s."""
    mib = bytes_per_second / _MiB
    return f"{mib:.{2 if mib < 10 else 1 if mib < 100 else 0}f} MiB/s"


def format_duration(seconds: float) -> str:
    """"45 s", "3 min", "1 h 20 min": a wait, as a person says it."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min" if minutes % 60 else f"{minutes // 60} h"
