"""A command on a pseudo-terminal of its own, typed at as a person would."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time


def _take_the_terminal() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # so that /dev/tty is this pty, as in a login shell


class Terminal:
    """``screen`` is everything the command wrote so far, as bytes."""

    def __init__(self, argv: list[str], *, columns: int = 80, lines: int = 24, **popen) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self._fd = master
        self.screen = b""
        self.child = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                      preexec_fn=_take_the_terminal, **popen)
        os.close(slave)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.child.poll() is None:
            self.child.kill()
            self.child.wait()
        os.close(self._fd)

    def read_until(self, marker: bytes | re.Pattern[bytes], timeout: float = 30.0) -> bytes:
        """What appeared from now until ``marker`` (bytes, or a pattern) did, or the command ended."""
        start = len(self.screen)
        pattern = marker if isinstance(marker, re.Pattern) else re.compile(re.escape(marker))
        self._read(lambda: pattern.search(self.screen, start) is not None, timeout)
        return self.screen[start:]

    def type(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\n")

    def press_ctrl_c(self) -> None:
        os.write(self._fd, b"\x03")  # the terminal turns it into SIGINT for the foreground job

    def wait(self, timeout: float = 30.0) -> int:
        """The exit status, once the command has ended and its last words are read."""
        self._read(lambda: self.child.poll() is not None, timeout)
        return self.child.wait(timeout)

    def echoes(self) -> bool:
        """Whether the terminal echoes what is typed (a pty's master reads its settings)."""
        return bool(termios.tcgetattr(self._fd)[3] & termios.ECHO)

    def text(self) -> str:
        return self.screen.decode(errors="replace")

    def rows_drawn(self) -> list[str]:
        """Each text the terminal drew from the start of a row (cursor moves and colours removed)."""
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", self.text())
        return [row for row in re.split(r"[\r\n]", plain) if row]

    def _read(self, done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            ready, _, _ = select.select([self._fd], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self._fd, 4096)
                except OSError:  # the command closed the terminal
                    return
        while select.select([self._fd], [], [], 0)[0]:  # what it wrote last
            try:
                chunk = os.read(self._fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.screen += chunk
