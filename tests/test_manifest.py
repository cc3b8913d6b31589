import hashlib
import json
import os
import shutil
import subprocess
import uuid

import pytest

from storage import manifest as mf
from storage.manifest import (
    StageManifest,
    code_version,
    file_sha256,
    is_fresh,
    read_manifest,
    write_manifest,
)


def make(**kw):
    base = dict(stage="extract", config_digest="c" * 64, input_hashes={"ckpt": "a" * 64, "ann": "b" * 64}, items_done=5000)
    base.update(kw)
    return StageManifest(**base)


def test_write_read_round_trip(tmp_path):
    m = make(extra={"n_gpus": 1})
    path = write_manifest(tmp_path, m)
    assert path == str(tmp_path / "manifests" / "extract.json")
    assert json.loads((tmp_path / "manifests" / "extract.json").read_text())["items_done"] == 5000
    back = read_manifest(tmp_path, "extract")
    assert back == m
    assert os.listdir(tmp_path / "manifests") == ["extract.json"]  # no temp files left
    assert read_manifest(tmp_path, "other") is None


def test_write_is_atomic(tmp_path, monkeypatch):
    write_manifest(tmp_path, make(items_done=1))

    def boom(*a, **k):
        raise OSError("disk died during rename")

    monkeypatch.setattr(mf.os, "replace", boom)
    with pytest.raises(OSError, match="rename"):
        write_manifest(tmp_path, make(items_done=2))
    monkeypatch.undo()
    assert read_manifest(tmp_path, "extract").items_done == 1  # old version intact
    assert os.listdir(tmp_path / "manifests") == ["extract.json"]


def test_url_round_trip():
    url = f"memory://{uuid.uuid4().hex}/run"
    m = make()
    write_manifest(url, m)
    assert read_manifest(url, "extract") == m
    assert read_manifest(url, "missing") is None


def test_updated_timestamp_and_unknown_keys(tmp_path):
    m = make(created="2020-01-01T00:00:00+00:00", updated="2020-01-01T00:00:00+00:00")
    write_manifest(tmp_path, m)
    assert m.created == "2020-01-01T00:00:00+00:00" and m.updated > m.created
    p = tmp_path / "manifests" / "extract.json"
    d = json.loads(p.read_text())
    d["future_field"] = 1
    p.write_text(json.dumps(d))
    assert read_manifest(tmp_path, "extract").items_done == 5000
    p.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_manifest(tmp_path, "extract")
    with pytest.raises(ValueError):
        write_manifest(tmp_path, make(stage="../evil"))


def test_is_fresh_reasons():
    m = make()
    ok, why = is_fresh(m, "c" * 64, {"ckpt": "a" * 64, "ann": "b" * 64})
    assert ok and "fresh" in why

    ok, why = is_fresh(None, "c" * 64, {})
    assert not ok and "no manifest" in why

    ok, why = is_fresh(m, "d" * 64, m.input_hashes)
    assert not ok and "config digest changed" in why and "cccccccccccc -> dddddddddddd" in why

    ok, why = is_fresh(m, m.config_digest, {"ckpt": "e" * 64, "ann": "b" * 64})
    assert not ok and "inputs changed: ckpt" in why and "config" not in why

    ok, why = is_fresh(m, m.config_digest, {"ckpt": "a" * 64, "ann": "b" * 64, "imgs": "f"})
    assert not ok and "new inputs: imgs" in why

    ok, why = is_fresh(m, m.config_digest, {"ckpt": "a" * 64})
    assert not ok and "no longer used: ann" in why

    ok, why = is_fresh(m, "x", {"ckpt": "e"})
    assert not ok and "config" in why and "ckpt" in why and "ann" in why


def test_file_sha256(tmp_path):
    data = os.urandom(3 * (1 << 20) + 123)  # spans several read chunks
    p = tmp_path / "blob.bin"
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()
    assert file_sha256(str(p), chunk_size=1000) == hashlib.sha256(data).hexdigest()
    assert file_sha256(p.as_uri()) == hashlib.sha256(data).hexdigest()


def test_code_version_fallback_and_git(tmp_path, monkeypatch):
    monkeypatch.setattr(mf, "REPO_ROOT", tmp_path)  # not a git checkout
    assert code_version() == "mfiba-0.1.0" or code_version() == "unknown"

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, env=env, check=True, capture_output=True, text=True).stdout.strip()
    run("init", "-q")
    (tmp_path / "f.txt").write_text("1")
    run("add", "f.txt")
    run("commit", "-q", "-m", "init")
    sha = run("rev-parse", "HEAD")
    assert code_version() == sha
    (tmp_path / "f.txt").write_text("2")
    assert code_version() == f"{sha}-dirty"
    assert make().code_version == f"{sha}-dirty"  # default filled at construction
