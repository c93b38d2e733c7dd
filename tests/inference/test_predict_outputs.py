"""predict.py's pieces: which files PATH means, rows for unreadable images, top-k, and the CSV/JSON written."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrain.artifacts.metadata import Preprocessing
from retrain.errors import ConfigError, DataError
from retrain.inference.inputs import PredictImages, find_images
from retrain.inference.predictions import output_format, top_k, write_predictions

PRE = Preprocessing(image_size=32, resize=37, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8)).save(path)
    return path


def test_a_folder_is_searched_recursively_for_images_only(tmp_path: Path) -> None:
    a = _image(tmp_path / "a.jpg")
    b = _image(tmp_path / "deep" / "er" / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    _image(tmp_path / ".hidden.jpg")
    assert find_images(str(tmp_path)) == [a, b]
    assert find_images(str(b)) == [b]


def test_a_glob_keeps_every_matched_file_and_a_missing_path_is_explained(tmp_path: Path) -> None:
    a = _image(tmp_path / "x" / "a.jpg")
    junk = tmp_path / "x" / "b.jpg"
    junk.write_text("garbage")
    assert find_images(str(tmp_path / "**" / "*.jpg")) == [a, junk]
    with pytest.raises(DataError, match=r"matched no files"):
        find_images(str(tmp_path / "*.webp"))
    with pytest.raises(DataError, match=r"does not exist"):
        find_images(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no images in it"):
        find_images(str(tmp_path / "empty"))


def test_an_unreadable_image_becomes_an_error_not_an_exception(tmp_path: Path) -> None:
    good = _image(tmp_path / "good.jpg")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)  # starts like a JPEG, then nothing
    dataset = PredictImages([good, bad], PRE)
    image, error = dataset[0]
    assert image.shape == (3, 32, 32) and error == ""
    image, error = dataset[1]
    assert image.shape == (3, 32, 32) and error.startswith(("corrupt", "truncated"))


def test_top_k_is_sorted_and_capped_by_the_class_count() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    (row,) = top_k(logits, ["cat", "dog", "fox"], 5)
    assert [label for label, _ in row] == ["dog", "fox", "cat"]
    assert sum(p for _, p in row) == pytest.approx(1.0, abs=1e-5)


def test_csv_and_json_hold_one_record_per_image(tmp_path: Path) -> None:
    rows = [
        {"path": "a.jpg", "top_k": [("dog", 0.7), ("cat", 0.2)], "error": None},
        {"path": "b.jpg", "top_k": [], "error": "corrupt: broken"},
    ]
    write_predictions(rows, tmp_path / "p.csv", "csv", 2)
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "label_1", "prob_1", "label_2", "prob_2", "error"]
    assert table[0]["label_1"] == "dog" and float(table[0]["prob_1"]) == 0.7 and table[0]["error"] == ""
    assert table[1]["label_1"] == "" and table[1]["error"] == "corrupt: broken"
    write_predictions(rows, tmp_path / "p.json", "json", 2)
    records = json.loads((tmp_path / "p.json").read_text())
    assert records[0]["top_k"][0] == {"label": "dog", "prob": 0.7} and records[1]["error"] == "corrupt: broken"


def test_output_format_follows_the_suffix_unless_asked() -> None:
    assert output_format(Path("p.json"), None) == "json"
    assert output_format(Path("p.csv"), None) == "csv"
    assert output_format(Path("p.txt"), "json") == "json"
    with pytest.raises(ConfigError, match=r"predict\.format='xml'"):
        output_format(Path("p.csv"), "xml")


def test_a_folder_link_loop_adds_no_rows_and_a_file_reached_twice_is_one_row(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    a = _image(photos / "a.jpg")
    b = _image(photos / "sub" / "b.png")
    c = _image(tmp_path / "outside" / "c.jpg")
    (photos / "self").symlink_to(".")  # a loop: photos/self/self/... is photos again
    (photos / "alias.jpg").symlink_to("a.jpg")  # the same file under a second name
    (photos / "sub" / "ext").symlink_to(tmp_path / "outside")  # a linked folder outside the tree is followed
    assert find_images(str(photos)) == [a, b, photos / "sub" / "ext" / c.name]


def test_a_link_to_the_parent_folder_ends_and_reads_each_real_folder_once(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    a = _image(photos / "a.jpg")
    c = _image(tmp_path / "outside" / "c.jpg")
    (photos / "up").symlink_to("..")  # photos/up/photos/up/... would never end
    assert find_images(str(photos)) == [a, photos / "up" / "outside" / c.name]


def test_files_a_folder_walk_leaves_out_are_counted_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # .gif files in input=FOLDER were dropped with no count or notice.
    _image(tmp_path / "a.jpg")
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    (tmp_path / ".hidden.gif").write_bytes(b"GIF89a")
    with caplog.at_level(logging.WARNING, logger="retrain"):
        assert find_images(str(tmp_path)) == [tmp_path / "a.jpg"]
    assert "1 files without an image extension left out (.gif 1)" in caplog.text
