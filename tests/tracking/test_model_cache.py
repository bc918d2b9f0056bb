"""The checked model cache: checksums recorded at download and checked at every resolve, and the cache
standing in for the registry while it is down (a dead loopback port), on a real MLflow SQLite store."""

from __future__ import annotations

import json

import pytest

from mobile_vla.errors import ModelError
from tests.local_processes import free_port
from tests.tracking.test_registry import make_model_dir, start_run

NAME = "cache-test"


@pytest.fixture()
def registered(platform_home, tmp_path):
    """v1 @champion (policy/ + onnx/), v2 @challenger, both registered; only v1 resolved so far."""
    from mobile_vla import tracking

    assert tracking.register_policy(make_model_dir(tmp_path, "a"), start_run(), name=NAME, alias="champion") == "1"
    assert tracking.register_policy(make_model_dir(tmp_path, "b"), start_run(), name=NAME, alias="challenger") == "2"
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "signature.json").write_text('{"chunk": 8}')
    tracking.attach_artifacts(NAME, "1", onnx_dir, "onnx")
    return tracking.resolve_model(f"models:/{NAME}@champion")


def registry_down(monkeypatch) -> None:
    """MLflow pointed at a loopback port nothing listens on (no retries: refused at once)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def test_checksums_are_recorded_at_download_and_a_corrupt_file_is_fetched_again(registered):
    from mobile_vla.tracking import cache_problems, resolve_model

    manifest = json.loads((registered.path / "cache_manifest.json").read_text())
    assert set(manifest) >= {"policy/config.json", "onnx/signature.json"} and not registered.from_cache
    assert cache_problems(registered.path) == []
    config = registered.path / "policy" / "config.json"
    config.write_text(config.read_text().replace('"a"', '"x"'))  # same size, other bytes
    (registered.path / "onnx" / "signature.json").unlink()
    assert cache_problems(registered.path) == ["onnx/signature.json", "policy/config.json"]
    again = resolve_model(f"models:/{NAME}/1")
    assert json.loads(config.read_text())["marker"] == "a"  # the registry's bytes again, not the damaged ones
    assert (again.path / "onnx" / "signature.json").read_text() == '{"chunk": 8}'
    assert cache_problems(again.path) == [] and not again.from_cache


def test_registry_down_serves_the_verified_cache_by_the_alias_last_seen(registered, monkeypatch):
    from mobile_vla.tracking import RegistryUnreachable, get_version_by_alias, resolve_model

    registry_down(monkeypatch)
    with pytest.raises(RegistryUnreachable, match="did not answer"):
        get_version_by_alias(NAME, "champion")  # never "no such alias": the URL of the call names one
    cached = resolve_model(f"models:/{NAME}@champion")
    assert (cached.from_cache, cached.version, cached.alias, cached.path) == (True, "1", "champion", registered.path)
    assert resolve_model(f"models:/{NAME}/1").from_cache
    with pytest.raises(RegistryUnreachable, match="never resolved alias 'challenger'"):
        resolve_model(f"models:/{NAME}@challenger")
    with pytest.raises(RegistryUnreachable, match="no cached copy of version 2"):
        resolve_model(f"models:/{NAME}/2")


def test_registry_down_refuses_a_corrupt_or_unchecked_cache(registered, monkeypatch):
    from mobile_vla.tracking import RegistryUnreachable, resolve_model

    weights = registered.path / "policy" / "config.json"
    good = weights.read_bytes()
    registry_down(monkeypatch)
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped
    with pytest.raises(ModelError, match=r"corrupt \(policy/config.json differ.*refusing to serve it"):
        resolve_model(f"models:/{NAME}@champion")
    weights.write_bytes(good)
    (registered.path / "cache_manifest.json").unlink()  # a copy cached before checksums were recorded
    with pytest.raises(RegistryUnreachable, match="no recorded checksums"):
        resolve_model(f"models:/{NAME}@champion")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the registry is back: the copy is checked and recorded again
    assert not resolve_model(f"models:/{NAME}@champion").from_cache
    assert "policy/config.json" in json.loads((registered.path / "cache_manifest.json").read_text())


def test_a_file_unchanged_since_it_was_hashed_is_not_read_again_and_a_hidden_write_still_is(registered, monkeypatch):
    """Replica starts resolve the same version again and again: a file whose size, mtime and ctime are
    those recorded with its hash is trusted without reading it; a same-size write that puts the old
    mtime back changes the ctime, so it is hashed, found corrupt and fetched again."""
    import os

    from mobile_vla.tracking import registry, resolve_model

    monkeypatch.setattr(registry, "_RACY_WINDOW_NS", 0)  # no waiting out the racy window in a test
    hashed = []
    real_digest = registry._digest
    monkeypatch.setattr(registry, "_digest", lambda path: hashed.append(path.name) or real_digest(path))
    manifest_file = registered.path / "cache_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert all("stat" in entry for entry in manifest.values())  # recorded at download
    for entry in manifest.values():
        del entry["stat"]  # as a cache written before stat records were kept
    manifest_file.write_text(json.dumps(manifest))
    resolve_model(f"models:/{NAME}/1")  # hashes every file and records its stat
    assert "config.json" in hashed and all("stat" in e for e in json.loads(manifest_file.read_text()).values())
    hashed.clear()
    resolve_model(f"models:/{NAME}/1")
    assert hashed == []  # nothing read: every stat is the recorded one

    config = registered.path / "policy" / "config.json"
    before = config.stat()
    config.write_text(config.read_text().replace('"a"', '"x"'))  # same size, other bytes
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))  # the old mtime back
    again = resolve_model(f"models:/{NAME}/1")
    assert hashed == ["config.json", "config.json"]  # only the file whose ctime moved: found bad, then fetched
    assert json.loads((again.path / "policy" / "config.json").read_text())["marker"] == "a"  # fetched again
