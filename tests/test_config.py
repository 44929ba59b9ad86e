"""Configuration: both layouts, validation, permissions, and no secret shown."""

import json

import pytest

from async_embed_sync.config import DEFAULT_PATTERNS, load_config
from async_embed_sync.errors import ConfigError, KeyPermissionError, UnknownClusterError

SECRET = "s3cr3t-Pa55word"


def _key(tmp_path, mode=0o600):
    key = tmp_path / "id_test"
    key.write_text("not really a key")
    key.chmod(mode)
    return key


def _write(path, document, mode=0o600):
    path.write_text(json.dumps(document))
    path.chmod(mode)
    return path


def test_json_config_with_defaults(tmp_path):
    key = _key(tmp_path)
    path = _write(tmp_path / "credentials.json", {"clusters": {
        "tensor01": {"host": "h1", "username": "u", "key_file": str(key), "remote_dir": "/d"},
        "tensor02": {"host": "h2", "port": 2222, "password": SECRET, "remote_dir": "/e",
                     "pattern": "*.pkl"},
    }})
    config = load_config(path)
    one, two = config.clusters["tensor01"], config.clusters["tensor02"]
    # Left out: the ssh config, then ssh's defaults decide (remote.resolve_target).
    assert (one.host, one.port, one.known_hosts, one.patterns) == ("h1", None, None, DEFAULT_PATTERNS)
    assert (two.port, two.patterns, two.password) == (2222, ("*.pkl",), SECRET)
    assert config.warnings == ()
    assert SECRET not in repr(config)


def test_legacy_credentials_dir(tmp_path):
    folder = tmp_path / ".credentials"
    folder.mkdir()
    for name in ("tensor01", "tensor02"):
        _write(folder / f"{name}.credentials", {"host": name, "remote_dir": f"/{name}"})
    config = load_config(credentials_dir=folder)
    assert sorted(config.clusters) == ["tensor01", "tensor02"]
    assert config.clusters["tensor02"].remote_dir == "/tensor02"


def test_default_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no configuration found"):
        load_config()
    (tmp_path / ".credentials").mkdir()
    _write(tmp_path / ".credentials" / "old.credentials", {"host": "h", "remote_dir": "/d"})
    assert list(load_config().clusters) == ["old"]
    _write(tmp_path / "credentials.json", {"clusters": {"new": {"host": "h", "remote_dir": "/d"}}})
    assert list(load_config().clusters) == ["new"]


@pytest.mark.parametrize("names", [["tensor02", "tensor01"], ["tensor02 tensor01"], ["tensor02,tensor01"]])
def test_select_accepts_both_forms(tmp_path, names):
    path = _write(tmp_path / "c.json", {"clusters": {
        n: {"host": n, "remote_dir": "/d"} for n in ("tensor01", "tensor02", "tensor03")}})
    assert [c.name for c in load_config(path).select(names)] == ["tensor02", "tensor01"]
    assert len(load_config(path).select(None)) == 3


def test_unknown_cluster_lists_known_ones(tmp_path):
    path = _write(tmp_path / "c.json", {"clusters": {"tensor01": {"host": "h", "remote_dir": "/d"}}})
    with pytest.raises(UnknownClusterError) as info:
        load_config(path).select(["tensor09"])
    assert "tensor09" in str(info.value) and "tensor01" in str(info.value)


def test_world_readable_key_is_refused_with_chmod_hint(tmp_path):
    key = _key(tmp_path, 0o644)
    path = _write(tmp_path / "c.json", {"clusters": {
        "tensor01": {"host": "h", "key_file": str(key), "remote_dir": "/d"}}})
    with pytest.raises(KeyPermissionError) as info:
        load_config(path)
    assert f"chmod 600 {key}" in str(info.value)


def test_readable_password_file_warns_without_showing_it(tmp_path):
    path = _write(tmp_path / "c.json", {"clusters": {
        "tensor01": {"host": "h", "password": SECRET, "remote_dir": "/d"}}}, mode=0o644)
    config = load_config(path)
    assert len(config.warnings) == 1
    assert "chmod 600" in config.warnings[0] and SECRET not in config.warnings[0]


@pytest.mark.parametrize("document, expected", [
    ({"clusters": {}}, "at least one cluster"),
    ({"clusters": {"t": {"remote_dir": "/d"}}}, "'host'"),
    ({"clusters": {"t": {"host": "h"}}}, "'remote_dir'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "port": "22"}}}, "'port'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "hots": 1}}}, "unknown field"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "pattern": []}}}, "'pattern'"),
    ({"clusters": {"t": {"host": "h", "remote_dir": "/d", "key_file": "/nonexistent/key"}}}, "does not exist"),
])
def test_invalid_settings_name_file_and_field(tmp_path, document, expected):
    path = _write(tmp_path / "c.json", document)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_broken_json_is_reported_without_echoing_content(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"clusters": {"t": {"password": "' + SECRET + '" oops')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 1" in str(info.value) and SECRET not in str(info.value)
