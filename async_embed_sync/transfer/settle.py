"""When a listed file counts as finished: its last write is older than the settle window.

A GPU job writes its checkpoints in place (``pickle.dump``, ``np.save``) or
under a temporary name it then renames; a file seen mid-write looks like a
smaller, valid-sized file. Its size and mtime are the only signs, and a
writer pauses between its bursts, so "unchanged during the copy" is not
enough: a file is taken as finished only once it was last modified at
least ``settle`` seconds before the listing that saw it.

60 s by default: longer than the pauses of a live writer (an ``np.save`` or
``pickle.dump`` of a 150 MB piece takes seconds; a ``.jsonl`` appender
flushes every few seconds; NFS clients may show a write up to 60 s late,
its default attribute cache), and short enough that a run started a minute
after the last job ended takes everything. The server's mtimes are compared
with this machine's clock, as ``make`` and ``rsync --update`` do: clusters and
laptops keep theirs by NTP, and a server clock that runs ahead only makes
files look newer, so they wait longer, never less.

Why the server's sha256 vouches for the version listed: it is computed
between the listing and the stat that closes the copy, and a file is put in
place only when that stat equals the listing's. A write in between would
have moved the mtime, except within the same second at the same size: a
file that close to its listing is recorded ``recheck``, and fetched again by
the next sync rather than trusted on its size and mtime.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_SETTLE_SECONDS = 60.0
# SFTP (version 3) gives whole seconds, and clocks differ by a second or so:
# a file written this close to its listing may have been written again in
# the same second, at the same size, and no listing could tell.
MTIME_RESOLUTION = 2.0


@dataclass(frozen=True)
class ListingTime:
    """When a listing was taken (this machine's clock), and the settle window it is judged by."""

    at: float
    settle: float = DEFAULT_SETTLE_SECONDS

    def age(self, mtime: int) -> float:
        """Seconds from the file's last write to the listing (negative: the server's clock runs ahead)."""
        return self.at - mtime

    def still_settling(self, mtime: int) -> bool:
        """Written within the settle window before the listing: maybe still being written."""
        return self.settle > 0 and self.age(mtime) < self.settle

    def too_recent_to_trust(self, mtime: int) -> bool:
        """So close to the listing that a same-size rewrite in the same second would look alike:
        complete, but not to be judged up to date on its size and mtime later."""
        return self.age(mtime) < self.settle + MTIME_RESOLUTION

    def settling_reason(self, mtime: int) -> str:
        age = max(self.age(mtime), 0.0)
        return (f"last modified {age:.0f} s before it was listed, within the settle window of "
                f"{self.settle:.0f} s (--settle)")
