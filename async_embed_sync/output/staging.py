"""The staging area beside the output, and the atomic publish of what was written there.

Nothing appears at the output path until :func:`publish` renames the staged
result into place; the staging area is removed on any exception, Ctrl-C
included, and one left by a killed merge is removed by the next merge to the
same output (:func:`remove_stale_staging`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from pathlib import Path
from types import TracebackType

from ..errors import AFTER_MERGE, translating_local_errors
from .spec import OutputSpec

_STAGING_SUFFIX = ".merging"
_PREVIOUS_SUFFIX = ".previous"


def _owner_tag() -> str:
    # Which process owns a staging entry: a later merge removes it once that
    # process is gone. Dots in the host name are kept: the pid is parsed from the right.
    return f"{socket.gethostname()}.{os.getpid()}"


def _owner_is_gone(tag: str) -> bool:
    host, _, pid = tag.rpartition(".")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's, or not ours to judge
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_staging(output: Path) -> list[Path]:
    """Remove what killed merges to ``output`` left beside it (their process is gone); return it."""
    prefix = f".{output.name}."
    removed = []
    try:
        names = os.listdir(output.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        rest = name[len(prefix) :]
        if rest.endswith(_STAGING_SUFFIX):
            tag = rest[: -len(_STAGING_SUFFIX)].rpartition(".")[0]  # drop mkdtemp's random part
        elif rest.endswith(_PREVIOUS_SUFFIX):
            tag = rest[: -len(_PREVIOUS_SUFFIX)]
        else:
            continue
        if _owner_is_gone(tag):
            shutil.rmtree(output.parent / name, ignore_errors=True)
            removed.append(output.parent / name)
    return removed


def _make_staging_directory(output: Path) -> Path:
    """A new hidden directory beside ``output``, named as :func:`remove_stale_staging` expects.

    Not ``tempfile.mkdtemp``: its 0700 would become the published bundle's
    mode, whatever the umask; ``mkdir(0o777)`` lets the umask decide, as
    for any directory the user makes (a group-readable bundle on a shared
    file system under umask 002).
    """
    while True:
        path = output.parent / f".{output.name}.{_owner_tag()}.{secrets.token_hex(4)}{_STAGING_SUFFIX}"
        try:
            path.mkdir(0o777)
            return path
        except FileExistsError:
            continue


class StagingArea:
    """A hidden directory beside the output of ``spec``, removed on leaving unless it was published."""

    def __init__(self, spec: OutputSpec):
        self.spec = spec
        self.output = spec.path
        self.path = self.output  # replaced on entry
        self._made_folders: list[Path] = []  # the output's missing parents, made here, innermost first

    def __enter__(self) -> StagingArea:
        self.spec.check_path()
        with translating_local_errors(self.output, "write", AFTER_MERGE):
            parent = self.output.parent
            self._made_folders = [folder for folder in (parent, *parent.parents) if not folder.exists()]
            self.output.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.output)
            self.path = _make_staging_directory(self.output)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # After a publish of a bundle the directory has moved away: nothing left.
        shutil.rmtree(self.path, ignore_errors=True)
        if exc_type is not None:
            # A merge that failed leaves no trace, not even the folders it
            # made for its output; rmdir removes a folder only while empty.
            for folder in self._made_folders:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _replace_directory(source: Path, target: Path) -> None:
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.{_owner_tag()}{_PREVIOUS_SUFFIX}")
        os.replace(target, previous)
    os.replace(source, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def publish(staging: StagingArea) -> None:
    """Rename the finished result in ``staging`` into place, atomically."""
    output = staging.output
    staging.spec.check_path()  # the path may have changed while the merge ran
    with translating_local_errors(output, "write", AFTER_MERGE):
        if staging.spec.is_pickle:
            os.replace(staging.path / output.name, output)
        else:
            _replace_directory(staging.path, output)
