"""Files here that their cluster no longer lists, and which of them are copies a sync verified.

HPC scratch file systems purge old files: a checkpoint synced and verified
last month may be gone from the cluster today, its copy here the only one
left. That copy is a *verified copy* when the journal (``layout.py``)
records it complete and it is in place at the size verified; a ``.npy``
checkpoint is one only if its sidecar (``.json``) and its article file
(``.jsonl``, or the one the sidecar names) are verified copies too. The
merge takes a verified copy unless files its cluster holds now cover any
of its rows (the run was re-split there: they win); a file that no sync
verified (put here by hand) is left out.

Shared by ``status`` (``transfer/``) and the merge (``merging/``), which
may not import each other, with the words said about such files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import some_names
from .layout import DownloadLayout, FileState

_NPY_SUFFIX = ".npy"


@dataclass(frozen=True)
class VerifiedCopy:
    """A checkpoint here, gone from its cluster, that a sync verified (every part of it)."""

    path: Path
    # When the sync verified it (seconds since the epoch); 0.0 for a journal written before that was recorded.
    verified_at: float

    @property
    def cluster(self) -> str:
        return DownloadLayout.cluster_of(self.path)

    def kept_line(self) -> str:
        """The merge's one line about it."""
        return (f"kept: {self.cluster}/{self.path.name} is gone from {self.cluster} (purged from scratch?); "
                f"merged from the copy verified here {verified_when([self.verified_at])}")


def verified_when(times: Sequence[float]) -> str:
    """"on 2026-11-02 14:03" (local time), "from ... to ..." for several, or "at an earlier sync"
    where the journal predates the record of when."""
    known = sorted(t for t in times if t > 0)
    if not known or len(known) < len(times):
        return "at an earlier sync"
    first, last = (time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) for t in (known[0], known[-1]))
    return f"on {first}" if first == last else f"from {first} to {last}"


def articles_file_name(sidecar: Mapping[str, object], npy: Path) -> str | None:
    """The article file a ``.npy`` checkpoint's sidecar names (``articles_file``, by default
    ``<stem>.jsonl``), if it is a plain file name: the name comes from the remote machine, and
    only a file beside the array is read. None otherwise."""
    name = sidecar.get("articles_file", npy.with_suffix(".jsonl").name)
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
        return None
    return name


def checkpoint_parts(path: Path) -> list[Path]:
    """The files one checkpoint is: a ``.pkl`` alone; a ``.npy`` with its sidecar and article file.

    A sidecar that cannot be read (or names no plain file) counts as naming
    the default ``<stem>.jsonl``: opening the checkpoint refuses it anyway."""
    path = Path(path)
    if path.suffix != _NPY_SUFFIX:
        return [path]
    sidecar = path.with_suffix(".json")
    try:
        document = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        document = {}
    name = articles_file_name(document, path) if isinstance(document, dict) else None
    return [path, sidecar, path.with_name(name or path.with_suffix(".jsonl").name)]


def verified_copy(layout: DownloadLayout, path: Path) -> VerifiedCopy | None:
    """The checkpoint at ``path`` (``<download-dir>/<cluster>/<name>``) as a copy a sync verified:
    every part of it recorded complete in the journal and in place at the size verified. None if not."""
    first, *others = (_verified_state(layout, part) for part in checkpoint_parts(path))
    if first is None or any(state is None for state in others):
        return None
    return VerifiedCopy(Path(path), first.verified_at)


def _verified_state(layout: DownloadLayout, path: Path) -> FileState | None:
    cluster = layout.cluster_of(path)
    state = layout.load_state(cluster, path.name)
    if state is None or not state.complete:
        return None
    try:
        size = layout.final_path(cluster, path.name).stat().st_size
    except OSError:
        return None
    return state if size == state.remote_size else None


def sort_gone(layout: DownloadLayout, cluster: str, names: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """``names``, the files here that ``cluster`` no longer lists (``layout.local_only``): the verified
    copies (name -> when verified), and the rest, in the order given.

    A ``.npy`` checkpoint's sidecar and article file go with it: all are
    verified copies, or none is."""
    folder = layout.root / cluster
    whole: dict[str, bool] = {}
    for name in names:
        if Path(name).suffix == _NPY_SUFFIX:
            verified = verified_copy(layout, folder / name) is not None
            whole.update((part.name, verified) for part in checkpoint_parts(folder / name) if part.name in names)
    states = {name: _verified_state(layout, folder / name) if whole.get(name, True) else None for name in names}
    return ({name: state.verified_at for name, state in states.items() if state is not None},
            [name for name, state in states.items() if state is None])


def gone_from_cluster_notice(layout: DownloadLayout, cluster: str, names: Sequence[str]) -> str:
    """What ``sync`` and ``status`` say of ``names``, the files here that ``cluster`` no longer lists:
    a line for the verified copies (kept, and merged), a line for the files no sync verified (kept,
    and left out of the merge); "" for no name."""
    verified, unverified = sort_gone(layout, cluster, names)
    lines = []
    if verified:
        lines.append(
            f"{cluster}: {len(verified)} file(s) kept here, gone from the cluster (purged from scratch?): "
            f"{some_names(list(verified))}, verified here {verified_when(list(verified.values()))}. The merge takes "
            f"them from here, unless files the cluster holds now cover their rows (re-split there): those win. "
            f"They are the only copies now: keep them.")
    if unverified:
        lines.append(
            f"{cluster}: {len(unverified)} file(s) here are no longer on the cluster and no sync verified "
            f"them ({some_names(unverified)}): put here by hand? They are kept, and left out of the merge; "
            f"delete them by hand once you no longer need them.")
    return "\n".join(lines)
