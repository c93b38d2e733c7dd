"""export.py in-process: counts that would measure nothing are refused before the model loads, and an int8 file
that misses its accuracy target is a warning in the log, not only a line of the table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from clitools import composed

import retrain.tasks.export as export_task
from retrain.errors import ConfigError
from retrain.export.benchmark import Targets, assemble
from retrain.tasks.export import _out_dir, _warn_int8_accuracy, export


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("export.val_images=0", r"export\.val_images=0; expected 1 or more validation images"),
        ("export.val_images=-3", r"export\.val_images=-3; expected 1 or more"),
        ("export.calib_images=0", r"export\.calib_images=0; expected 1 or more training images"),
        ("export.batch_size=0", r"export\.batch_size=0; expected 1 or more images per batch"),
    ],
)
def test_counts_that_would_measure_nothing_are_refused_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, override: str, said: str
) -> None:
    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded: the setting was checked too late")

    monkeypatch.setattr(export_task, "load_trained", never)
    cfg = composed(tmp_path, "ckpt_path=pets@latest", "formats=[onnx]", override, config="export")
    with pytest.raises(ConfigError, match=rf"{said}.*Fix: export\."):
        export(cfg)


def _row(acc: float, file: str | None) -> dict[str, Any]:
    return {"file": file, "size_mb": 1.0, "val_images": 40, "val_acc": acc, "agreement": 0.8,
            "max_abs_logit_diff": 0.3, "latency_ms_b1": 5.0, "throughput_b32": 500.0}  # fmt: skip


def test_an_int8_file_that_misses_its_accuracy_target_is_a_logged_warning(caplog: pytest.LogCaptureFixture) -> None:
    rows = {"eager": _row(0.90, None), "int8": _row(0.825, "exports/model.int8.pt2")}
    report = {**assemble(rows, Targets()), "source": "pets@v002"}
    with caplog.at_level(logging.WARNING, logger="retrain"):
        _warn_int8_accuracy(report)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.name == "retrain"
    message = record.getMessage()
    assert "the int8 model lost 7.5 points of validation accuracy" in message
    assert "exports/model.int8.pt2" in message and "export.calib_images" in message and "experiment=qat" in message
    caplog.clear()
    rows["int8"]["val_acc"] = 0.895  # within the 1-point target: nothing to warn about
    _warn_int8_accuracy(assemble(rows, Targets()))
    assert not caplog.records


def test_an_out_dir_given_for_a_registry_version_is_set_aside_with_a_warning(
    tmp_path: Path, small_state: Any, publish_version: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # `export.py ckpt_path=demo@v001 export.out_dir=dist` wrote into the version's exports/ and no dist/, in silence.
    folder = publish_version(small_state)
    cfg = composed(tmp_path, "ckpt_path=cats@v001", "export.out_dir=dist", config="export")
    with caplog.at_level(logging.WARNING, logger="retrain"):
        assert _out_dir(cfg, "cats@v001", tmp_path / "models", ["export.out_dir=dist"]) == folder / "exports"
    assert "export.out_dir=dist is set aside: cats@v001 is a registry version" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrain"):
        _out_dir(cfg, "cats@v001", tmp_path / "models", [])
    assert not caplog.text
