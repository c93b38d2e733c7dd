"""Eval, export, predict and report load a model and its data one way, and say the same thing when they do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clitools import make_imagefolder

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.data.splits import discover
from retrain.errors import ArtifactError, ConfigError, DataError
from retrain.model.loading import load_trained, trained_splits

CLASSES = ["cat", "dog", "fox"]


def _meta(make_metadata, **fields) -> ArtifactMetadata:
    return ArtifactMetadata.from_dict(make_metadata(class_names=CLASSES, **fields))


def test_a_version_comes_back_as_its_network_in_eval_mode_with_typed_metadata(publish_version, resnet_state):
    version = publish_version(resnet_state, class_names=CLASSES)
    net, meta = load_trained(str(version), model_dir=version.parents[1])
    assert not net.training and net.fc.out_features == 3
    assert torch.equal(net.state_dict()["fc.weight"], resnet_state["fc.weight"])
    assert meta.class_names == CLASSES and meta.preprocessing.crop == 32 and meta.name == "cats"


def test_weights_without_metadata_say_what_is_missing(tmp_path, resnet_state):
    torch.save(resnet_state, tmp_path / "plain.pth")
    with pytest.raises(ArtifactError, match=r"plain.pth carries no retrain metadata \(arch, class_names, "):
        load_trained(str(tmp_path / "plain.pth"), model_dir=tmp_path)


def test_the_recorded_folder_is_the_default_and_other_classes_are_refused(make_metadata, imagefolder, tmp_path):
    meta = _meta(make_metadata, dataset={"root": str(imagefolder), "layout": "split"})
    assert trained_splits(meta, None, source="cats@v1").class_names == CLASSES
    other = make_imagefolder(tmp_path / "other", classes=("cat", "dog", "emu"), per_class=2)
    with pytest.raises(DataError) as info:
        trained_splits(meta, other, source="cats@v1", option="--data-root DIR")
    said = str(info.value)
    assert "['cat', 'dog', 'emu']) differ from the model's (['cat', 'dog', 'fox'])" in said
    assert "Fix: pass --data-root DIR with those classes" in said and "model.init_from=cats@v1" in said
    with pytest.raises(ConfigError, match=r"cats@v1 records no dataset, and data.root is not set"):
        trained_splits(_meta(make_metadata), None, source="cats@v1")


def test_a_flat_folder_is_split_as_recorded_even_after_it_moved(make_metadata, tmp_path):
    folder = make_imagefolder(tmp_path / "flat", layout="folder", per_class=5)
    trained = discover(folder, val_fraction=0.3, test_fraction=0.2, seed=7)  # not the defaults
    trained.save(tmp_path / "run" / "split.json")
    recorded = {**trained.summary(), "split_file": str(tmp_path / "run" / "split.json")}
    meta = _meta(make_metadata, dataset=recorded)
    same = trained_splits(meta, folder, source="cats@v1")
    # Reloaded from split.json, it says how it was drawn (the log said data.val_fraction=0.0, data.split_seed=0).
    assert (same.split_seed, same.val_fraction, same.test_fraction) == (7, 0.3, 0.2)
    moved = folder.rename(tmp_path / "moved")
    again = trained_splits(meta, moved, source="cats@v1", moved=True)
    for split in ("train", "val", "test"):
        names = [Path(p).name for p, _ in trained.samples[split]]
        assert [Path(p).name for p, _ in same.samples[split]] == names
        assert [Path(p).name for p, _ in again.samples[split]] == names
    # Without `moved` too: the same files anywhere are split as recorded (eval's own seed would score training images).
    assert trained_splits(meta, moved, source="cats@v1").sizes() == trained.sizes()
    other = make_imagefolder(tmp_path / "other", layout="folder", per_class=7)  # other images: the given fractions
    assert trained_splits(meta, other, source="cats@v1").sizes() == discover(other).sizes() != trained.sizes()


def test_a_copy_of_the_flat_folder_is_split_as_recorded_and_a_grown_one_is_said_to_be_drawn_anew(
    make_metadata, tmp_path, caplog
):
    # eval data.root=COPY used eval's own seed: 5 of 7 "test" images were training images, at exit 0.
    folder = make_imagefolder(tmp_path / "flat", layout="folder", per_class=6)
    trained = discover(folder, val_fraction=0.3, test_fraction=0.2, seed=7)
    meta = _meta(make_metadata, dataset=trained.summary())
    copy = make_imagefolder(tmp_path / "copy", layout="folder", per_class=6)  # the same files (same names, bytes)
    with caplog.at_level("WARNING", logger="retrain"):
        again = trained_splits(meta, copy, source="cats@v1")
    assert {s: [Path(p).name for p, _ in items] for s, items in again.samples.items()} == {
        s: [Path(p).name for p, _ in items] for s, items in trained.samples.items()
    }
    assert "drawn anew" not in caplog.text
    # The training folder grew since (its run folder, with split.json, gone): the same seed draws other test images.
    make_imagefolder(tmp_path / "flat", layout="folder", per_class=9)
    with caplog.at_level("WARNING", logger="retrain"):
        trained_splits(meta, folder, source="cats@v1")
    assert "holds other images than the folder cats@v1 was trained on" in caplog.text
    assert "score too high" in caplog.text and "DIR/test/<class>/" in caplog.text
