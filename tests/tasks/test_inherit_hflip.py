"""A model trained with data.hflip=false keeps it when retrained or resumed, unless the command line sets it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from retrain.artifacts.formats import Artifact
from retrain.data.transforms import preprocessing
from retrain.tasks.common import inherit_hflip


def _parent(hflip: bool) -> Artifact:
    metadata = {"preprocessing": preprocessing(32, hflip=hflip).to_dict()}
    return Artifact({}, metadata, Path("models/digits/v001/weights.pth"), "state_dict", None)


def test_a_model_that_must_not_be_mirrored_is_retrained_without_mirroring(caplog: pytest.LogCaptureFixture) -> None:
    # `experiment=retrain name=digits` (no data.hflip): v002 trained on mirrored digits, and tta=flip was accepted.
    data = OmegaConf.create({"hflip": True})
    with caplog.at_level(logging.INFO, logger="retrain"):
        inherit_hflip(data, _parent(hflip=False), ["experiment=retrain", "name=digits"])
    assert data.hflip is False and "data.hflip=false, as models/digits/v001/weights.pth was trained" in caplog.text


def test_the_command_line_decides_and_a_mirrorable_parent_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    data = OmegaConf.create({"hflip": True})
    with caplog.at_level(logging.INFO, logger="retrain"):
        inherit_hflip(data, _parent(hflip=False), ["data.hflip=true"])
    assert data.hflip is True and "although models/digits/v001/weights.pth was trained with data.hflip" in caplog.text
    for parent in (_parent(hflip=True), None):
        inherit_hflip(data, parent, [])
        assert data.hflip is True
