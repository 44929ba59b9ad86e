"""What a person sees in a real 80-column terminal: whole bars in MiB, and Ctrl-C said once.

The CLI runs on a pseudo-terminal of its own against the real sshd, behind a
slow emulated link so that the bars are seen moving; Ctrl-C is typed, so the
terminal itself sends the SIGINT, as it does for a person.
"""

from __future__ import annotations

import os
import re
import sys

from terminal import Terminal

from async_embed_sync.testing.netproxy import run_in_thread

MiB = 1024 * 1024
# Long names, as GPUs write them, so that the labels must be shortened to fit.
NAMES = [f"wikipedia_embeddinggemma-300m_gpu{gpu}_rows_{gpu * 62500:07d}-{(gpu + 1) * 62500:07d}.pkl"
         for gpu in range(3)]


def test_an_80_column_terminal_shows_whole_bars_and_ctrl_c_says_one_line(openssh, tmp_path, write_config):
    remote = tmp_path / "remote"
    remote.mkdir()
    for name in NAMES:
        (remote / name).write_bytes(os.urandom(6 * MiB))
    with run_in_thread(openssh.host, openssh.port, rate=3 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01-a100-partition": openssh.cluster_entry(
            str(remote), port=proxy.port)})
        with Terminal([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                       "--download-dir", str(tmp_path / "dl")], columns=80) as terminal:
            for _ in range(2):  # a refresh or two, with a rate and an ETA
                terminal.read_until(re.compile(rb"\d\.\d\dMiB/s"))
            terminal.press_ctrl_c()
            assert terminal.wait() == 130, terminal.text()
    rows = [row.replace("^C", "") for row in terminal.rows_drawn()]  # the terminal's echo of the key
    too_wide = [row for row in rows if len(row) > 80]
    assert not too_wide, too_wide  # a longer row wraps, and the bars pile up
    bars = [row for row in rows if "MiB/s" in row]
    assert bars, rows
    moving = [bar for bar in bars if re.search(r"\d\.\d\dMiB/s", bar)]
    assert moving and all(re.search(r"\d\d:\d\d<\d\d:\d\d", bar) for bar in moving), bars  # elapsed<ETA kept
    assert not [row for row in rows if re.search(r"\d(k|M|G)B/s|\dB/s|\?iB|s/MiB", row)], rows  # MiB/s only
    assert all(re.search(r"\| \d+\.\d/\d+\.\d MiB \[", bar) for bar in bars), bars  # amounts in MiB too
    labels = {bar.split(":")[0] for bar in bars if not bar.startswith("total")}
    assert len(labels) >= 1 and all(label.endswith(".pkl") for label in labels), labels  # the tail tells files apart
    said = [row for row in rows if "MiB/s" not in row and "%|" not in row]
    assert [row for row in said if row.startswith("Interrupted.")] == [said[-1]], said  # one line, last
    assert "failed" not in terminal.text().lower() and "Traceback" not in terminal.text()


def _screen(terminal: Terminal, columns: int, lines: int) -> list[str]:
    """The rows a terminal of that size shows after everything the command wrote (and the pty echoed)."""
    import pyte

    screen = pyte.Screen(columns, lines)
    pyte.ByteStream(screen).feed(terminal.screen)
    return [row.rstrip() for row in screen.display]


def test_the_demo_stopped_by_ctrl_c_mid_transfer_says_one_line_and_nothing_after_it(tmp_path):
    """Ctrl-C typed while the demo's files arrive: exit 130, the one line, and
    nothing after it. A stop often finds the simulated clusters still hashing
    files for sha256sum; such a command left running used to end the output
    with asyncio's "Task was destroyed but it is pending!" and a task's repr.
    Tried a few times, at a different point of the transfer each time."""
    for attempt in range(4):
        demo = [sys.executable, "-m", "async_embed_sync", "demo", "--dir", str(tmp_path / "demo")]
        with Terminal(demo, columns=80, cwd=tmp_path) as terminal:
            # The total bar between 1 and 99 %: the transfer is under way.
            terminal.read_until(re.compile(rb"total: +[1-9]\d?%"))
            for _ in range(attempt):  # a later point: a refresh or more further
                terminal.read_until(b"MiB/s]")
            terminal.press_ctrl_c()
            code = terminal.wait()
        text = terminal.text()
        assert code == 130, text
        assert "Interrupted. The demo starts over" in text, text
        after = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text[text.index("Interrupted."):].partition("\n")[2])
        assert not after.strip(), after
        assert "Traceback" not in text and "Task was destroyed" not in text, text
        # What the screen shows at the end (through a terminal emulator): the
        # terminal's own "^C" echo must not wrap a full-width bar onto the next
        # row, where the bar was then drawn again and the closing line glued on.
        shown = _screen(terminal, 80, 24)
        assert sum(row.startswith("total") for row in shown) <= 1, shown
        assert [row for row in shown if "Interrupted." in row][0].startswith("Interrupted."), shown


def test_many_files_in_flight_on_a_short_terminal_draw_one_stack_of_bars_that_fits(openssh, tmp_path, write_config):
    """40 files in flight (the default --max-parallel is 128) on a 10-row terminal:
    bars past the last row would scroll it, and every refresh would draw the
    stack again beneath. What the screen shows is read through a terminal
    emulator (pyte), after the cursor moves."""
    remote = tmp_path / "remote"
    remote.mkdir()
    for index in range(40):
        (remote / f"gpu{index % 4}_step{index:03d}.pkl").write_bytes(os.urandom(MiB))
    with run_in_thread(openssh.host, openssh.port, rate=2 * MiB) as proxy:
        config = write_config(tmp_path, {"tensor01": openssh.cluster_entry(str(remote), port=proxy.port)})
        with Terminal([sys.executable, "-m", "async_embed_sync", "sync", "--config", str(config),
                       "--download-dir", str(tmp_path / "dl")], columns=80, lines=10) as terminal:
            for _ in range(3):
                terminal.read_until(re.compile(rb"\d\.\d\dMiB/s"))
            shown = _screen(terminal, 80, 10)
            terminal.press_ctrl_c()
            assert terminal.wait() == 130, terminal.text()
    shown = [row for row in shown if not row.startswith("connecting to ")]  # the line said before the bars
    totals = [row for row in shown if row.startswith("total")]
    assert len(totals) == 1 and shown.index(totals[0]) == 0, shown  # one stack, from the top row
    assert re.match(r"total \(\+\d+ in flight\): ", totals[0]), shown  # the files without a bar are counted
    files = [row for row in shown if row.startswith("tensor01/")]
    assert 1 <= len(files) <= 7 and len({row.split(":")[0] for row in files}) == len(files), shown  # 10 rows - 3
