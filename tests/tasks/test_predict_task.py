"""predict.py in-process: one image prints its answer, an earlier preds.csv is never overwritten by default, a
folder as output= is refused before predicting, and NaN scores are error rows that fail the run."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from clitools import CLASSES, composed, save_random_model, write_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import retrain.tasks.predict as predict_task
from retrain.artifacts.formats import SAFETENSORS_DIGEST_KEY
from retrain.errors import ArtifactError, ConfigError
from retrain.inference.runtimes import Runtime
from retrain.tasks.predict import NON_FINITE, predict
from retrain.utils.hydra import run_task


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 3-class ResNet18 as .safetensors with retrain metadata."""
    return save_random_model(tmp_path_factory.mktemp("model") / "model.safetensors")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three small images in one folder."""
    rng = np.random.default_rng(0)
    for i, name in enumerate(CLASSES):
        write_image(tmp_path / "photos" / f"{i}_{name}.jpg", i, rng)
    return tmp_path / "photos"


def test_one_image_prints_its_answer_and_leaves_an_earlier_preds_csv_alone(
    tmp_path: Path, model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "preds.csv").write_text("an earlier run's predictions\n")
    image = photos / "0_cat.jpg"
    results = predict(composed(tmp_path, f"ckpt_path={model}", f"input={image}", config="predict"))
    (answer,) = capsys.readouterr().out.splitlines()
    labels = answer.removeprefix(f"{image}: ").split("  ")
    assert sorted(label.split()[0] for label in labels) == sorted(CLASSES)
    assert (tmp_path / "preds.csv").read_text() == "an earlier run's predictions\n"
    assert results["output"] == str(tmp_path / "run" / "preds.csv")
    with open(tmp_path / "run" / "preds.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert answer.startswith(f"{image}: {row['label_1']} {float(row['prob_1']):.3f}")


def test_an_existing_folder_as_output_is_refused_before_predicting(
    tmp_path: Path, model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: Any, **kwargs: Any) -> Runtime:
        raise AssertionError("the model was loaded: the folder was found too late")

    monkeypatch.setattr(predict_task, "load_predictor", never)
    (tmp_path / "out").mkdir()
    cfg = composed(tmp_path, f"ckpt_path={model}", f"input={photos}", f"output={tmp_path / 'out'}", config="predict")
    with pytest.raises(ConfigError, match=r"output=.*out is a folder.*Fix: output=.*out/preds.csv"):
        predict(cfg)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("predict.batch_size=0", r"predict\.batch_size=0; expected 1 or more images per batch\. Fix:"),
        ("predict.num_workers=-1", r"predict\.num_workers=-1; expected 0 .* Fix:"),
    ],
)
def test_loader_settings_torch_would_reject_are_refused_before_the_model_loads(
    tmp_path: Path, model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, override: str, said: str
) -> None:
    def never(*args: Any, **kwargs: Any) -> Runtime:
        raise AssertionError("the model was loaded: the setting was checked too late")

    monkeypatch.setattr(predict_task, "load_predictor", never)
    cfg = composed(tmp_path, f"ckpt_path={model}", f"input={photos}", override, config="predict")
    with pytest.raises(ConfigError, match=said):
        predict(cfg)


def test_nan_scores_are_error_rows_and_the_run_fails(
    tmp_path: Path, model: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    eager = predict_task.load_predictor(str(model), model_dir=tmp_path, allow_pickle=False)

    def nan_for_the_second(images: torch.Tensor) -> torch.Tensor:
        logits = eager.predict(images).clone()
        logits[1] = float("nan")  # what an export with broken weights (or an overflow) gives
        return logits

    broken = Runtime("onnx", nan_for_the_second, eager.info)
    monkeypatch.setattr(predict_task, "load_predictor", lambda *args, **kwargs: broken)
    cfg = composed(tmp_path, f"ckpt_path={model}", f"input={photos}", config="predict")
    with pytest.raises(SystemExit) as failed:
        run_task(predict, cfg)
    assert failed.value.code == 1
    assert "gave NaN or inf scores for 1 of 3 images (first: " in capsys.readouterr().err
    with open(tmp_path / "run" / "preds.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["error"] for row in rows] == ["", NON_FINITE, ""]
    assert rows[1]["label_1"] == "" and rows[0]["label_1"] in CLASSES
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and results["errors"] == 1


def test_a_model_with_nan_weights_is_refused_by_tensor_name(tmp_path: Path, model: Path, photos: Path) -> None:
    with safe_open(str(model), "pt") as f:
        header = f.metadata()
    del header[SAFETENSORS_DIGEST_KEY]  # as another tool writes it: the weights are the file's own, no digest
    state = load_file(str(model))
    state["fc.bias"][2] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"), metadata=header)
    cfg = composed(tmp_path, f"ckpt_path={tmp_path / 'nan.safetensors'}", f"input={photos}", config="predict")
    with pytest.raises(ArtifactError, match=r"1 tensors hold NaN or inf: fc.bias \(1 of 3 values\)"):
        predict(cfg)
