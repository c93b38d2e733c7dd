"""predict.py as a user runs it: any SOURCE or an exported file, a folder or a glob, bad images in their rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from clitools import CLASSES, assert_ok, run_cli

from retrain.artifacts.formats import save_safetensors
from retrain.artifacts.metadata import ArtifactMetadata
from retrain.data.transforms import preprocessing
from retrain.export.onnx import export_onnx
from retrain.inference.deploy_info import deploy_info, to_props
from retrain.model.resnet import build_resnet

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random 3-class ResNet18 saved as .safetensors with retrain metadata, and exported to ONNX."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    net = build_resnet("resnet18", len(CLASSES)).eval()
    meta = ArtifactMetadata(arch="resnet18", class_names=list(CLASSES), preprocessing=preprocessing(32))
    save_safetensors(net.state_dict(), meta.to_dict(), folder / "model.safetensors")
    export_onnx(net, torch.randn(2, 3, 32, 32), folder / "model.onnx", to_props(deploy_info(meta, "test")), opset=23)
    return {"safetensors": folder / "model.safetensors", "onnx": folder / "model.onnx"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path) -> Path:
    """Five images in nested folders, one of them a broken JPEG."""
    root = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(CLASSES):
        shutil.copy(next((imagefolder / "test" / name).glob("*.jpg")), root / f"{i}_{name}.jpg")
    (root / "more").mkdir()
    shutil.copy(next((imagefolder / "val" / "dog").glob("*.png")), root / "more" / "dog.png")
    (root / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    return root


@pytest.fixture(scope="module")
def folder_run(model_files, photos: Path, tmp_path_factory: pytest.TempPathFactory):
    """predict.py on the folder with the .safetensors artifact (the eager model), default CSV output."""
    cwd = tmp_path_factory.mktemp("predict")
    result = run_cli("predict.py", f"ckpt_path={model_files['safetensors']}", f"input={photos}", cwd=cwd)
    assert_ok(result)
    with open(result.runs("predict")[-1] / "preds.csv") as f:  # the run's own folder, by default
        result.first = {"rows": list(csv.DictReader(f))}
    return result


def test_a_folder_gives_one_csv_row_per_image_with_bad_ones_as_errors(folder_run) -> None:
    rows = folder_run.first["rows"]
    assert [Path(r["path"]).name for r in rows] == ["0_cat.jpg", "1_dog.jpg", "2_fox.jpg", "broken.jpg", "dog.png"]
    assert list(rows[0]) == [
        "path",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
        "error",
    ]  # top-5 capped
    good = [r for r in rows if not r["error"]]
    assert len(good) == 4
    assert all({r["label_1"], r["label_2"], r["label_3"]} == set(CLASSES) for r in good)
    assert all(float(r["prob_1"]) >= float(r["prob_2"]) >= float(r["prob_3"]) for r in good)
    broken = rows[3]
    assert broken["label_1"] == "" and broken["error"]
    assert json.loads(next((folder_run.cwd / "logs" / "predict").rglob("results.json")).read_text())["errors"] == 1


def test_an_onnx_file_predicts_a_glob_as_json_in_batches(model_files, photos: Path, folder_run, tmp_path: Path) -> None:
    result = run_cli(
        "predict.py",
        f"ckpt_path={model_files['onnx']}",
        f"input={photos}/**/*.jpg",
        "output=out/preds.json",
        "predict.top_k=2",
        "predict.batch_size=2",
        cwd=tmp_path,
    )
    assert_ok(result)
    records = json.loads((tmp_path / "out" / "preds.json").read_text())
    assert [Path(r["path"]).name for r in records] == ["0_cat.jpg", "1_dog.jpg", "2_fox.jpg", "broken.jpg"]
    assert all(len(r["top_k"]) == 2 for r in records if not r["error"])
    # The ONNX export gives the eager model's answers.
    eager = {Path(r["path"]).name: r for r in folder_run.first["rows"]}
    for record in records:
        if record["error"]:
            continue
        row = eager[Path(record["path"]).name]
        assert record["top_k"][0]["label"] == row["label_1"]
        assert record["top_k"][0]["prob"] == pytest.approx(float(row["prob_1"]), abs=1e-4)
    assert "predicting" in result.stderr  # a progress bar: more than one batch


def test_it_fails_only_when_no_image_could_be_read(model_files, photos: Path, tmp_path: Path) -> None:
    result = run_cli("predict.py", f"ckpt_path={model_files['onnx']}", f"input={photos}/more/broken.jpg", cwd=tmp_path)
    assert result.returncode == 1
    assert "None of the 1 images" in result.stderr and "Traceback" not in result.stderr
    with open(result.runs("predict")[-1] / "preds.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["error"]
