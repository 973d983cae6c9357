"""Shared fixtures: the real imagery tests run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from onboard.models.data import default_data_root

REPO = Path(__file__).resolve().parents[1]
TEST_DATA = REPO / "tests" / "data"
SAMPLE = REPO / "runtime" / "sample" / "hongkong"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared imagery (``ONBOARD_DATA``); tests that need it skip, saying why, without it."""
    path = default_data_root()
    if not (path / "README.md").exists():
        pytest.skip(f"shared imagery not found at {path} (set ONBOARD_DATA)")
    return path


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def sample_pass() -> Path:
    return SAMPLE
