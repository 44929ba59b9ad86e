"""The journal: atomic, versioned, and forgiving of damage."""

import os

from async_embed_sync.layout import DownloadLayout, FileState, file_identity


def test_round_trip_and_layout(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("tensor01")
    state = FileState(remote_size=10, remote_mtime=5, verified_offset=4, prefix_sha256="ab")
    layout.save_state("tensor01", "a.pkl", state)
    assert layout.load_state("tensor01", "a.pkl") == state
    assert layout.final_path("tensor01", "a.pkl") == tmp_path / "tensor01" / "a.pkl"
    # Partials and state live outside the cluster folder the merge reads.
    assert layout.partial_path("tensor01", "a.pkl").parent == layout.state_root / "tensor01"
    assert layout.state_root.name.startswith(".")
    assert not list((layout.state_root / "tensor01").glob(".*.tmp"))


def test_damaged_or_foreign_state_reads_as_absent(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("c")
    path = layout.state_path("c", "a.pkl")
    for damaged in ('{"remote_size": 1', '{"version": 99, "remote_size": 1, "remote_mtime": 1}',
                    '{"version": 1, "unexpected": true}', "\x00\x00"):
        path.write_text(damaged)
        assert layout.load_state("c", "a.pkl") is None
    assert layout.load_state("c", "missing.pkl") is None


def test_forget_removes_partial_and_state(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("c")
    layout.partial_path("c", "a").write_bytes(b"xx")
    layout.save_state("c", "a", FileState(2, 2))
    layout.forget("c", "a")
    layout.forget("c", "a")  # twice is fine
    assert not layout.partial_path("c", "a").exists()
    assert layout.load_state("c", "a") is None


def _record_complete(layout: DownloadLayout, cluster: str, name: str, sha256: str) -> None:
    state = FileState(1, 1, complete=True, sha256=sha256, verified_by="sha256",
                      local_identity=file_identity(layout.final_path(cluster, name)))
    layout.save_state(cluster, name, state)


def test_a_recorded_sha256_is_trusted_only_while_the_file_is_untouched(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("c")
    path = layout.final_path("c", "a.npy")
    path.write_bytes(b"synced bytes")
    _record_complete(layout, "c", "a.npy", "ab" * 32)

    assert layout.verified_sha256(path) == "ab" * 32
    assert layout.verified_sha256(tmp_path / "elsewhere" / "a.npy") is None
    assert layout.verified_sha256(layout.final_path("c", "unknown.npy")) is None

    # Rewritten in place, same size, modification time put back: the change time tells.
    before = os.stat(path)
    path.write_bytes(b"edited bytes")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert layout.verified_sha256(path) is None


def test_a_state_without_the_file_identity_is_not_trusted(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("c")
    path = layout.final_path("c", "a.npy")
    path.write_bytes(b"synced bytes")
    # As written before the identity was recorded.
    layout.save_state("c", "a.npy", FileState(1, 1, complete=True, sha256="ab" * 32))

    assert layout.verified_sha256(path) is None


def test_local_copy_is_up_to_date_only_when_complete_unchanged_and_in_place(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("c")
    copy = layout.local_copy("c", "a.npy", 5, 7)
    assert copy.state is None and not copy.up_to_date and copy.kept == 0

    layout.save_state("c", "a.npy", FileState(5, 7, verified_offset=3, prefix_sha256="ab"))
    partial = layout.local_copy("c", "a.npy", 5, 7)
    assert not partial.up_to_date and partial.kept == 3
    assert layout.local_copy("c", "a.npy", 6, 7).kept == 3  # another version's prefix is still on disk

    layout.final_path("c", "a.npy").write_bytes(b"12345")
    layout.save_state("c", "a.npy", FileState(5, 7, complete=True, verified_offset=5))
    assert layout.is_up_to_date("c", "a.npy", 5, 7) and layout.local_copy("c", "a.npy", 5, 7).kept == 0
    assert not layout.is_up_to_date("c", "a.npy", 5, 8)  # changed on the server
    layout.final_path("c", "a.npy").write_bytes(b"1234")
    assert not layout.is_up_to_date("c", "a.npy", 5, 7)  # the file in place is not the one recorded


def test_complete_files_are_the_cluster_folders_visible_files(tmp_path):
    layout = DownloadLayout(tmp_path)
    for cluster in ("b", "a"):
        layout.prepare(cluster)
        layout.final_path(cluster, "x.pkl").write_bytes(b"x")
    layout.partial_path("a", "y.pkl").write_bytes(b"y")
    layout.save_state("a", "y.pkl", FileState(1, 1))
    layout.save_listing("a", ["x.pkl"])
    (tmp_path / "a" / ".hidden.pkl").write_bytes(b"h")
    (tmp_path / "a" / "folder.pkl").mkdir()
    (tmp_path / "stray.pkl").write_bytes(b"s")

    found = layout.complete_files()
    assert found == [tmp_path / "a" / "x.pkl", tmp_path / "b" / "x.pkl"]
    assert [layout.cluster_of(path) for path in found] == ["a", "b"]
    assert layout.local_only("a", []) == ["x.pkl"] and layout.local_only("a", ["x.pkl"]) == []
    assert layout.state_files() == [layout.state_path("a", "y.pkl")]
    assert layout.listing_files() == [layout.listing_path("a")]
