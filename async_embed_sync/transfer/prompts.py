"""Asking the person at the terminal: passwords, passphrases, 2FA codes.

The sync never reads the terminal itself; it asks a ``Prompter``. The CLI
passes a ``TerminalPrompter``; the tests pass a scripted one through the very
same hook. Answers are returned to the caller and never stored or printed.

A question serves one connection attempt, and waits for its answer on a
worker thread (asyncssh asks for a key's passphrase on threads of its own).
The attempt asks through its ``Questions``, which it withdraws when it ends,
however it ends (logged in, a timeout, Ctrl-C, the server giving up): a
question still waiting then ends at once, with the terminal's echo put back
and a half-typed answer discarded, and no thread is left reading the
terminal (which would keep the process from exiting until Enter is pressed).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import select
import termios
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio

T = TypeVar("T")

# A worker thread's wait that a cancellation does not wait for: anyio 4.1
# renamed ``cancellable`` (deprecated since) to ``abandon_on_cancel``.
_ABANDON_ON_CANCEL = next(name for name in ("abandon_on_cancel", "cancellable")
                          if name in inspect.signature(anyio.to_thread.run_sync).parameters)


class NoTerminal(Exception):
    """There is nobody to ask: no terminal to ask on (a batch job, CI)."""


class Withdrawn(Exception):
    """The question was given up: the connection attempt it served has ended."""


class Withdrawal:
    """Set once, from any thread, when the attempt that asks has ended.

    A question that waits for its answer waits, with ``wake_up()``'s file
    descriptor, for the withdrawal too; ``set()`` returns once every such
    wait has ended (within ``WAIT`` seconds: never a hang)."""

    WAIT = 5.0

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._set = False
        self._waiting: list[int] = []  # the write end of each waiting question's pipe

    def is_set(self) -> bool:
        with self._changed:
            return self._set

    def raise_if_set(self) -> None:
        if self.is_set():
            raise Withdrawn()

    def set(self) -> None:
        with self._changed:
            self._set = True
            for wake in self._waiting:
                os.write(wake, b"!")
            self._changed.wait_for(lambda: not self._waiting, timeout=self.WAIT)

    @contextlib.contextmanager
    def wake_up(self) -> Iterator[int]:
        """A file descriptor that becomes readable once this is set; ``set()``
        waits until the ``with`` block has ended. Raises ``Withdrawn`` if set already."""
        readable, wake = os.pipe()
        try:
            with self._changed:
                if self._set:
                    raise Withdrawn()
                self._waiting.append(wake)
            try:
                yield readable
            finally:
                with self._changed:
                    self._waiting.remove(wake)
                    self._changed.notify_all()
        finally:
            os.close(readable)
            os.close(wake)


class Prompter:
    """Ask one question; blocks until answered. Must be thread-safe."""

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        raise NotImplementedError

    def can_ask(self) -> bool:
        """Whether ``ask`` can reach anyone: a method nobody can answer is not attempted."""
        return True

    def ask_until(self, prompt: str, *, secret: bool, withdrawal: Withdrawal) -> str:
        """``ask``, given up (``Withdrawn``) once ``withdrawal`` is set. This
        default cannot stop ``ask`` midway, and drops an answer that comes
        too late; a prompter whose ``ask`` waits for a person overrides it."""
        withdrawal.raise_if_set()
        answer = self.ask(prompt, secret=secret)
        withdrawal.raise_if_set()
        return answer


class Questions:
    """The questions of one connection attempt, asked through ``prompter``
    from any thread; withdrawn when the ``with`` block (the attempt) ends."""

    def __init__(self, prompter: Prompter) -> None:
        self._prompter = prompter
        self._withdrawal = Withdrawal()

    def __enter__(self) -> Questions:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.withdraw()

    def can_ask(self) -> bool:
        return not self._withdrawal.is_set() and self._prompter.can_ask()

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        """Blocks until answered: call it on a worker thread. Raises
        ``NoTerminal`` (nobody to ask) or ``Withdrawn`` (the attempt has ended)."""
        return self._prompter.ask_until(prompt, secret=secret, withdrawal=self._withdrawal)

    async def ask_async(self, prompt: str, *, secret: bool = True) -> str:
        """``ask`` on a worker thread (see ``run_sync``)."""
        return await self.run_sync(functools.partial(self.ask, prompt, secret=secret))

    async def run_sync(self, func: Callable[[], T]) -> T:
        """``func()`` on a worker thread, where it may ask these questions.
        Cancelled, the questions are withdrawn: a question the thread is
        waiting on has ended before the cancellation goes on."""
        try:
            return await anyio.to_thread.run_sync(func, **{_ABANDON_ON_CANCEL: True})
        except anyio.get_cancelled_exc_class():
            self.withdraw()
            raise

    def withdraw(self) -> None:
        """A question still waiting ends now, and no other is asked."""
        self._withdrawal.set()


class NoPrompter(Prompter):
    """For runs that must never ask (``--quiet`` batch use, library calls)."""

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        raise NoTerminal(prompt)

    def can_ask(self) -> bool:
        return False


class TerminalPrompter(Prompter):
    """Reads from the controlling terminal (``device``), without echo for secrets.

    One question at a time: clusters connect concurrently, and two prompts
    interleaved on one terminal would be answered in the wrong order.

    The terminal is read here rather than by ``getpass``, whose read cannot
    be interrupted: a question is given up when its ``Withdrawal`` is set,
    and the terminal's settings are put back in every case.
    """

    def __init__(self, device: str = "/dev/tty") -> None:
        self._device = device
        self._lock = threading.Lock()

    def can_ask(self) -> bool:
        try:
            os.close(os.open(self._device, os.O_RDWR | os.O_NOCTTY))
        except OSError:
            return False
        return True

    def ask(self, prompt: str, *, secret: bool = True) -> str:
        return self.ask_until(prompt, secret=secret, withdrawal=Withdrawal())

    def ask_until(self, prompt: str, *, secret: bool, withdrawal: Withdrawal) -> str:
        while not self._lock.acquire(timeout=0.05):  # another cluster's question is on the terminal
            withdrawal.raise_if_set()
        try:
            with withdrawal.wake_up() as wake_up:
                return self._read_answer(prompt, secret, wake_up)
        finally:
            self._lock.release()

    def _read_answer(self, prompt: str, secret: bool, wake_up: int) -> str:
        try:
            terminal = os.open(self._device, os.O_RDWR | os.O_NOCTTY)
        except OSError as exc:
            raise NoTerminal(prompt) from exc
        try:
            try:
                settings = termios.tcgetattr(terminal)
            except termios.error as exc:
                raise NoTerminal(prompt) from exc
            if secret:
                quiet = list(settings)
                quiet[3] &= ~termios.ECHO
                # As getpass does: what was typed before the prompt is not the answer.
                termios.tcsetattr(terminal, termios.TCSAFLUSH, quiet)
            answered = False
            try:
                os.write(terminal, prompt.encode())
                answer = _read_line(terminal, wake_up, prompt)
                answered = True
            finally:
                # Each step on its own: a terminal gone fails them all, and needs none.
                if not answered:
                    # A half-typed answer (a secret) is not left for the shell to read.
                    _quietly(termios.tcflush, terminal, termios.TCIFLUSH)
                if secret:
                    _quietly(termios.tcsetattr, terminal, termios.TCSANOW, settings)
                if secret or not answered:
                    _quietly(os.write, terminal, b"\n")  # the Enter that was not echoed, or that never came
            return answer.decode("utf-8", errors="replace")
        finally:
            os.close(terminal)


def _quietly(step: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(termios.error, OSError):
        step(*args)


def _read_line(terminal: int, wake_up: int, prompt: str) -> bytes:
    """One line from the terminal, without its newline (an empty line on
    Ctrl-D); ``Withdrawn`` as soon as ``wake_up`` is readable."""
    poll = select.poll()
    poll.register(terminal, select.POLLIN)
    poll.register(wake_up, select.POLLIN)
    line = b""
    while True:
        ready = dict(poll.poll())
        if wake_up in ready:
            raise Withdrawn()
        try:
            chunk = os.read(terminal, 1024)
        except OSError as exc:  # the terminal hung up
            raise NoTerminal(prompt) from exc
        if not chunk:
            return line
        line += chunk
        if b"\n" in line:
            return line.split(b"\n", 1)[0].removesuffix(b"\r")
