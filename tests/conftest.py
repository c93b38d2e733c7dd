"""Shared fixtures; helpers live in tests/clitools.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import make_imagefolder


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only split-layout ImageFolder with 3 classes, shared by the whole session."""
    return make_imagefolder(tmp_path_factory.mktemp("data") / "images")
