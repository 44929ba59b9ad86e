"""Names from the server never become paths outside the download dir."""

import pytest

from async_embed_sync.errors import UnsafeRemoteNameError
from async_embed_sync.transfer.files import check_remote_name


@pytest.mark.parametrize("name", ["..", ".", "", "../x.pkl", "/etc/passwd", "a/b.pkl", "a\\b.pkl",
                                  "x\0.pkl", "x\n.pkl", "é" * 200 + ".pkl"])
def test_hostile_names_are_refused(name):
    with pytest.raises(UnsafeRemoteNameError) as info:
        check_remote_name("tensor01", name)
    assert "tensor01" in str(info.value)


@pytest.mark.parametrize("name", ["emb_gpu0_00000000_00031250.pkl", "..hidden.npy", "a b.json", "x" * 255])
def test_plain_names_pass(name):
    check_remote_name("tensor01", name)
