"""The terminal prompter at a real pseudo-terminal of the test's own.

A question is read without echo, and ends when the connection attempt it
serves is given up (``Questions.withdraw``, or the cancellation of
``ask_async``): the terminal's settings put back, a half-typed answer
thrown away, and no thread left reading the terminal, which would keep the
process from exiting until Enter is pressed.
"""

from __future__ import annotations

import os
import select
import termios
import threading
import time
from collections.abc import Iterator

import anyio
import pytest

from async_embed_sync.transfer.prompts import NoPrompter, NoTerminal, Questions, TerminalPrompter, Withdrawn


class PseudoTerminal:
    """A pty pair: ``device`` is what the prompter opens, ``master`` the keyboard and screen."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.device = os.ttyname(self._slave)
        self.screen = b""

    def close(self) -> None:
        os.close(self.master)
        os.close(self._slave)

    def read_until(self, marker: bytes, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.screen and time.monotonic() < deadline:
            if select.select([self.master], [], [], 0.1)[0]:
                self.screen += os.read(self.master, 4096)
        assert marker in self.screen, self.screen
        return self.screen

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def echoes(self) -> bool:
        return bool(termios.tcgetattr(self._slave)[3] & termios.ECHO)

    def unread_input(self, timeout: float = 1.0) -> bytes:
        """What was typed and not read by anyone (a complete line is needed: the terminal is canonical)."""
        if select.select([self._slave], [], [], timeout)[0]:
            return os.read(self._slave, 4096)
        return b""


@pytest.fixture
def terminal() -> Iterator[PseudoTerminal]:
    pty = PseudoTerminal()
    yield pty
    pty.close()


def _in_a_thread(func) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(func())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_secret_is_read_without_echo_and_the_echo_comes_back(terminal):
    questions = Questions(TerminalPrompter(terminal.device))
    thread, outcome = _in_a_thread(lambda: questions.ask("[tensor01] Password for alice@10.1.2.3: "))
    terminal.read_until(b"Password for alice@10.1.2.3: ")
    assert not terminal.echoes()
    terminal.type("hunter2\n")
    thread.join(10)
    assert outcome == ["hunter2"]
    assert terminal.echoes()
    assert b"hunter2" not in terminal.read_until(b"\n")


def test_an_answer_that_is_no_secret_is_echoed(terminal):
    thread, outcome = _in_a_thread(lambda: TerminalPrompter(terminal.device).ask("Code: ", secret=False))
    terminal.read_until(b"Code: ")
    assert terminal.echoes()
    terminal.type("492817\n")
    thread.join(10)
    assert outcome == ["492817"]
    assert b"492817" in terminal.read_until(b"492817")


def test_a_withdrawn_question_ends_at_once_and_leaves_the_terminal_as_it_was(terminal):
    questions = Questions(TerminalPrompter(terminal.device))
    thread, outcome = _in_a_thread(lambda: questions.ask("[tensor01] Passphrase for key /k: "))
    terminal.read_until(b"Passphrase for key /k: ")
    terminal.type("half of my pass")  # no Enter: the person is still typing

    questions.withdraw()  # the connection attempt is given up
    # By the time withdraw() returns, nobody reads the terminal any more.
    assert terminal.echoes()
    thread.join(2)
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], Withdrawn)
    # What was half typed was thrown away, and a line typed now is nobody's answer.
    terminal.type("ls\n")
    assert terminal.unread_input() == b"ls\n"
    # And no later question of that attempt is asked.
    with pytest.raises(Withdrawn):
        questions.ask("[tensor01] Password for alice@10.1.2.3: ")
    assert not questions.can_ask()


def test_a_question_waiting_its_turn_is_withdrawn_alone(terminal):
    """Two clusters ask on one terminal, one at a time; the second's attempt is given up while it waits."""
    prompter = TerminalPrompter(terminal.device)
    first, second = Questions(prompter), Questions(prompter)
    first_thread, first_outcome = _in_a_thread(lambda: first.ask("[one] Password: "))
    terminal.read_until(b"[one] Password: ")
    second_thread, second_outcome = _in_a_thread(lambda: second.ask("[two] Password: "))
    time.sleep(0.2)
    second.withdraw()
    second_thread.join(2)
    assert not second_thread.is_alive() and isinstance(second_outcome[0], Withdrawn)
    assert first_thread.is_alive()
    terminal.type("first answer\n")
    first_thread.join(10)
    assert first_outcome == ["first answer"]
    assert b"[two] Password: " not in terminal.screen


@pytest.mark.anyio
async def test_a_cancelled_question_has_ended_when_the_cancellation_goes_on(terminal):
    """As when a login times out, or Ctrl-C cancels the sync, while a prompt waits."""
    with Questions(TerminalPrompter(terminal.device)) as questions:
        with anyio.move_on_after(0.5) as waited:
            await questions.ask_async("[tensor01] Verification code: ")
        assert waited.cancelled_caught
        assert terminal.echoes()
        terminal.type("492817\n")
        assert terminal.unread_input() == b"492817\n"  # read by nobody
    assert b"Verification code: " in terminal.read_until(b"Verification code: ")


@pytest.mark.anyio
async def test_an_attempt_that_ends_withdraws_the_question_its_thread_asks(terminal):
    """A key's passphrase is asked on a thread asyncssh starts, not one awaited here."""
    with Questions(TerminalPrompter(terminal.device)) as questions:
        thread, outcome = _in_a_thread(lambda: questions.ask("[tensor01] Passphrase for key /k: "))
        terminal.read_until(b"Passphrase for key /k: ")
    assert terminal.echoes()
    thread.join(2)
    assert not thread.is_alive() and isinstance(outcome[0], Withdrawn)


@pytest.mark.anyio
async def test_run_sync_gives_back_what_the_thread_returned_or_raised():
    with Questions(NoPrompter()) as questions:
        assert await questions.run_sync(lambda: 42) == 42
        with pytest.raises(NoTerminal):
            await questions.ask_async("Password: ")


def test_without_a_terminal_nobody_is_asked(tmp_path):
    missing = TerminalPrompter(str(tmp_path / "no-such-tty"))
    assert not missing.can_ask()
    with pytest.raises(NoTerminal):
        missing.ask("Password: ")
    not_a_terminal = tmp_path / "file"
    not_a_terminal.write_text("")
    with pytest.raises(NoTerminal):
        TerminalPrompter(str(not_a_terminal)).ask("Password: ")
