"""An Adapter's artifact check (controllers.adapter.artifact_exists): local files by a stat, the same answer as
fsspec's (storage.exists) for files, directories, missing paths and broken links; other schemes through fsspec."""

from __future__ import annotations

import os

import pytest

from perennial import storage
from perennial.controllers.adapter import artifact_exists


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "pvc" / "artifacts" / "a1").mkdir(parents=True)
    (tmp_path / "pvc" / "artifacts" / "a1" / "adapter_config.json").write_text("{}")
    (tmp_path / "dir").mkdir()
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.symlink(tmp_path / "pvc" / "artifacts" / "a1" / "adapter_config.json", tmp_path / "link")
    return tmp_path


@pytest.mark.parametrize("rel", ["pvc/artifacts/a1/adapter_config.json", "dir", "missing/adapter_config.json", "broken", "link"])
def test_local_paths_answer_as_fsspec_does(tree, rel):
    uri = f"file://{tree / rel}"
    assert artifact_exists(uri, str(tree / "pvc")) is storage.exists(uri, str(tree / "pvc"))
    assert artifact_exists(str(tree / rel), str(tree / "pvc")) is storage.exists(str(tree / rel), str(tree / "pvc"))


def test_pvc_uris_are_read_under_the_mount(tree):
    root = str(tree / "pvc")
    assert artifact_exists("pvc://artifacts/a1/adapter_config.json", root) is True
    assert artifact_exists("pvc://artifacts/a2/adapter_config.json", root) is False


def test_other_schemes_go_through_fsspec(monkeypatch):
    seen = []
    monkeypatch.setattr(storage, "exists", lambda uri, root: seen.append(uri) or None)
    assert artifact_exists("s3://bucket/a1/adapter_config.json", "/pvc") is None
    assert seen == ["s3://bucket/a1/adapter_config.json"]
