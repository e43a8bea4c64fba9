"""Shared test fixtures: the development data folder and small helpers."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"development data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """Keep tests away from the user's data root, download folder and cache."""
    monkeypatch.delenv("OODBENCH_DATA_ROOT", raising=False)
    monkeypatch.delenv("OODBENCH_CACHE_DIR", raising=False)
    monkeypatch.setenv("OODBENCH_DOWNLOAD_DIR", str(tmp_path_factory.mktemp("downloads")))
