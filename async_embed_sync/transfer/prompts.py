"""Asking the person at the terminal: passwords, passphrases, 2FA codes.

The sync never reads the terminal itself; it asks a ``Prompter``. The CLI
passes a ``TerminalPrompter``; the tests pass a scripted one through the very
same hook. Answers are returned to the caller and never stored or printed.
"""

from __future__ import annotations

import getpass
import os
import threading


class NoTerminal(Exception):
    """There is nobody to ask: stdin is not a terminal (a batch job, CI)."""


class Prompter:
    """Ask one question; blocks until answered. Must be thread-safe."""

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        raise NotImplementedError

    def can_ask(self) -> bool:
        """Whether ``ask`` can reach anyone: a method nobody can answer is not attempted."""
        return True


class NoPrompter(Prompter):
    """For runs that must never ask (``--quiet`` batch use, library calls)."""

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        raise NoTerminal(prompt)

    def can_ask(self) -> bool:
        return False


class TerminalPrompter(Prompter):
    """Reads from the controlling terminal, without echo for secrets.

    One question at a time: clusters connect concurrently, and two prompts
    interleaved on one terminal would be answered in the wrong order.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def can_ask(self) -> bool:
        try:
            os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
        except OSError:
            return False
        return True

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        with self._lock:
            try:
                tty = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
            except OSError as exc:
                raise NoTerminal(prompt) from exc
            os.close(tty)
            if secret:
                return getpass.getpass(prompt)
            with open("/dev/tty", "r+", encoding="utf-8", errors="replace") as terminal:
                terminal.write(prompt)
                terminal.flush()
                return terminal.readline().rstrip("\n")
