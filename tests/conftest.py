"""Fixtures shared by the offline tests."""

import pytest


@pytest.fixture
def minari_root(tmp_path, monkeypatch):
    """A private Minari datasets directory for one test (nothing is downloaded; datasets are built into it)."""
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    return root
