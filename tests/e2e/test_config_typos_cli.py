"""Config typos through the CLI: Hydra's message plus our closest-key hint, and wrong types before any data."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import FAST, run_cli

pytestmark = pytest.mark.e2e


def test_unknown_key_keeps_hydras_message_and_adds_the_closest_key(tmp_path: Path) -> None:
    result = run_cli("train.py", "model.frezze=true", *FAST, cwd=tmp_path)
    assert result.returncode == 1
    assert "Could not override 'model.frezze'" in result.stderr  # Hydra's own words
    assert "hint: model.frezze is not a key of this config; did you mean model.freeze?" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing ran


def test_wrong_type_fails_before_any_data_is_read(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"  # were data read first, this would be the error
    result = run_cli("train.py", "trainer.max_epochs=abc", f"data.root={missing}", *FAST, cwd=tmp_path)
    assert result.returncode == 1
    assert "error: trainer.max_epochs=abc has the wrong type" in result.stderr
    assert "takes max_epochs as Optional[int], but got str 'abc'" in result.stderr
    assert "Fix: pass e.g. trainer.max_epochs=10." in result.stderr
    assert "no_such_folder" not in result.stderr and "Traceback" not in result.stderr


def test_a_wrong_type_in_data_or_model_is_hydras_compose_error(tmp_path: Path) -> None:
    result = run_cli("train.py", "model.lr=fast", f"data.root={tmp_path / 'no_such_folder'}", *FAST, cwd=tmp_path)
    assert result.returncode == 1
    assert "Error merging override model.lr=fast" in result.stderr  # the key and the value
    assert "Value 'fast' of type 'str' could not be converted to Float" in result.stderr  # the type expected
    assert "hint:" not in result.stderr and not (tmp_path / "logs").exists()  # nothing ran
