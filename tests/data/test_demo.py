"""The offline demo set: layout, formats, determinism, reuse, rebuild, and that colour does not give the class away."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.cli.main import main as retrain_cli
from retrain.data import demo
from retrain.errors import ConfigError, DataError

PER_CLASS = 12  # 8 train, 2 val, 2 test per class


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo.build_demo_dataset(tmp_path_factory.mktemp("demo") / "demo", per_class=PER_CLASS, image_size=32)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != demo.MARKER)


def test_layout_is_a_pre_split_image_folder_with_jpeg_and_png(built: Path) -> None:
    sizes = demo.split_sizes(PER_CLASS)
    assert sizes == {"train": 8, "val": 2, "test": 2}
    for split in demo.SPLITS:
        assert sorted(p.name for p in (built / split).iterdir()) == sorted(demo.CLASSES)
        for name in demo.CLASSES:
            assert len(list((built / split / name).iterdir())) == sizes[split]
    files = _files(built)
    assert len(files) == PER_CLASS * len(demo.CLASSES)
    assert {p.suffix for p in files} == {".jpg", ".png"}
    assert {p.suffix for p in (built / "train").rglob("*.*")} == {".jpg", ".png"}
    for path in files:
        with Image.open(path) as im:
            assert im.format == ("PNG" if path.suffix == ".png" else "JPEG")
            assert im.size == (32, 32)
            assert im.mode == "RGB"


def test_marker_records_parameters_and_counts(built: Path) -> None:
    marker = demo.read_marker(built)
    assert marker is not None
    assert marker["per_class"] == PER_CLASS
    assert marker["image_size"] == 32
    assert marker["classes"] == list(demo.CLASSES)
    assert marker["counts"]["val"] == dict.fromkeys(demo.CLASSES, 2)


def test_same_seed_same_images_other_seed_other_images(tmp_path: Path, built: Path) -> None:
    again = demo.build_demo_dataset(tmp_path / "again", per_class=PER_CLASS, image_size=32)
    other = demo.build_demo_dataset(tmp_path / "other", per_class=PER_CLASS, image_size=32, seed=1)
    for a, b in zip(_files(built), _files(again), strict=True):
        assert a.relative_to(built) == b.relative_to(again)
        assert a.read_bytes() == b.read_bytes()
    differing = [a for a, b in zip(_files(built), _files(other), strict=True) if a.read_bytes() != b.read_bytes()]
    assert len(differing) == len(_files(built))


def test_rerun_reuses_a_complete_set_and_force_rebuilds(tmp_path: Path) -> None:
    root = demo.build_demo_dataset(tmp_path / "demo", per_class=3, image_size=16)
    marker = root / demo.MARKER
    first = marker.stat().st_mtime_ns
    os.utime(marker, ns=(first - 10**9, first - 10**9))  # an older stamp, so a rewrite cannot go unseen
    stamped = marker.stat().st_mtime_ns

    assert demo.build_demo_dataset(root, per_class=3, image_size=16) == root
    assert marker.stat().st_mtime_ns == stamped

    demo.build_demo_dataset(root, per_class=3, image_size=16, force=True)
    assert marker.stat().st_mtime_ns != stamped
    assert len(_files(root)) == 3 * len(demo.CLASSES)


def test_other_parameters_or_missing_files_rebuild(tmp_path: Path) -> None:
    root = demo.build_demo_dataset(tmp_path / "demo", per_class=3, image_size=16)
    demo.build_demo_dataset(root, per_class=6, image_size=16)
    assert len(_files(root)) == 6 * len(demo.CLASSES)

    victim = next((root / "train" / "star").iterdir())
    victim.unlink()
    demo.build_demo_dataset(root, per_class=6, image_size=16)
    assert victim.exists()
    assert not list(tmp_path.glob(".demo.*")), "temp folders must not be left behind"


def test_refuses_to_overwrite_a_folder_it_did_not_build(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "tom.jpg").write_bytes(b"not ours")
    with pytest.raises(DataError, match=r"photos.*not a demo set"):
        demo.build_demo_dataset(root, per_class=3, image_size=16, force=True)
    assert (root / "cats" / "tom.jpg").read_bytes() == b"not ours"


def test_losing_the_rename_race_keeps_the_winners_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "demo"
    write_set = demo._write_set
    winner: dict[str, int] = {}

    def racing(out: Path, params: dict[str, object]) -> None:
        write_set(out, params)
        write_set(root, params)  # another process finishes first and owns root
        winner["inode"] = (root / demo.MARKER).stat().st_ino

    monkeypatch.setattr(demo, "_write_set", racing)
    assert demo.build_demo_dataset(root, per_class=3, image_size=16) == root
    assert (root / demo.MARKER).stat().st_ino == winner["inode"]
    assert len(_files(root)) == 3 * len(demo.CLASSES)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"], "the loser's temp folder must be removed"


def test_an_interrupted_build_leaves_nothing_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "demo"
    write_set = demo._write_set

    def interrupted(out: Path, params: dict[str, object]) -> None:
        (out / "train" / "circle").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_write_set", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo.build_demo_dataset(root, per_class=3, image_size=16)
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(demo, "_write_set", write_set)
    demo.build_demo_dataset(root, per_class=3, image_size=16)
    assert demo.read_marker(root) is not None


def test_bad_parameters_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="per_class"):
        demo.build_demo_dataset(tmp_path / "d", per_class=2)
    with pytest.raises(ConfigError, match="image_size"):
        demo.build_demo_dataset(tmp_path / "d", per_class=3, image_size=8)
    assert not (tmp_path / "d").exists()


def test_colour_does_not_give_the_class_away(tmp_path: Path) -> None:
    root = demo.build_demo_dataset(tmp_path / "demo", per_class=40, image_size=32)
    # Nearest class-mean classifier on the mean colour and the colour spread of each image: a set with one
    # colour per class would score near 1.0; shapes with shared colour ranges score near chance (1/6).
    feats, labels = [], []
    for label, name in enumerate(demo.CLASSES):
        for split in demo.SPLITS:
            for path in sorted((root / split / name).iterdir()):
                pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64).reshape(-1, 3)
                feats.append(np.concatenate([pixels.mean(axis=0), pixels.std(axis=0)]))
                labels.append(label)
    x, y = np.array(feats), np.array(labels)
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(len(demo.CLASSES))])
    predicted = np.linalg.norm(x[:, None, :] - centroids[None], axis=2).argmin(axis=1)
    accuracy = float((predicted == y).mean())
    assert accuracy < 0.45, f"mean colour predicts the class with accuracy {accuracy:.2f}"
    # And within one class the colours vary widely.
    circle_means = x[y == 0, :3]
    assert circle_means.std(axis=0).min() > 25


def test_cli_prints_where_and_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cli"
    assert retrain_cli(["demo-data", "--root", str(root), "--per-class", "3", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert str(root.resolve()) in out
    assert "train" in out and "6 images: 1 per class x 6" in out
    assert json.loads((root / demo.MARKER).read_text())["per_class"] == 3

    assert retrain_cli(["demo-data", "--root", str(root), "--per-class", "2"]) == 1
    assert "per_class" in capsys.readouterr().err
