"""The journal: atomic, versioned, and forgiving of damage."""

from async_embed_sync.journal import STATE_DIR_NAME, DownloadLayout, FileState


def test_round_trip_and_layout(tmp_path):
    layout = DownloadLayout(tmp_path)
    layout.prepare("tensor01")
    state = FileState(remote_size=10, remote_mtime=5, verified_offset=4, prefix_sha256="ab")
    layout.save_state("tensor01", "a.pkl", state)
    assert layout.load_state("tensor01", "a.pkl") == state
    assert layout.final_path("tensor01", "a.pkl") == tmp_path / "tensor01" / "a.pkl"
    # Partials and state live outside the cluster folder the merge reads.
    assert layout.partial_path("tensor01", "a.pkl").parent == tmp_path / STATE_DIR_NAME / "tensor01"
    assert not list((tmp_path / STATE_DIR_NAME / "tensor01").glob(".*.tmp"))


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
