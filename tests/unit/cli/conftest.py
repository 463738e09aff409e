"""Every CLI test caches its tokens in its own directory, never in the user's."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def token_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cli-cache"
    monkeypatch.setenv("TOOLMESH_CACHE_DIR", str(path))
    monkeypatch.delenv("TOOLMESH_TOKEN_CACHE", raising=False)
    return path
