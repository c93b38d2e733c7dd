"""A registry version whose files changed after publishing is refused on load, naming what was expected and found."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from retrain.artifacts.formats import save_weights_pth
from retrain.artifacts.integrity import verify_version
from retrain.artifacts.sources import load_source
from retrain.errors import ArtifactError
from retrain.utils.io import sha256_file


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the end of the last tensor: the file still parses, one weight differs
    path.write_bytes(bytes(data))


def test_publish_records_every_files_hash_and_size(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    (folder.parent / "v001" / "exports").mkdir()  # export.py writes here after publishing: never recorded
    files = json.loads((folder / "metadata.json").read_text())["files"]
    assert set(files) == {"model.safetensors", "weights.pth"}
    for name, record in files.items():
        assert record == {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    check = verify_version(folder)
    assert check.problems == () and check.files == 2


def test_changed_weights_are_refused_on_load_with_both_hashes(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    recorded = sha256_file(folder / "model.safetensors")
    flip_last_byte(folder / "model.safetensors")
    with pytest.raises(ArtifactError) as info:
        load_source("cats@v1", model_dir=tmp_path / "models")
    message = str(info.value)
    assert "changed since it was published" in message and "Fix:" in message
    assert recorded in message and sha256_file(folder / "model.safetensors") in message  # expected and found
    # weights.pth is intact, but the safetensors header it is compared through is not: refused as well.
    with pytest.raises(ArtifactError, match=r"model\.safetensors changed"):
        load_source(str(folder / "weights.pth"), model_dir=tmp_path / "models")


def test_a_replaced_weights_pth_is_refused(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    save_weights_pth({k: v + 1 if v.is_floating_point() else v for k, v in small_state.items()}, folder / "weights.pth")
    with pytest.raises(ArtifactError, match=r"weights\.pth changed since it was published"):
        load_source(str(folder / "weights.pth"), model_dir=tmp_path)
    assert load_source("cats@v1", model_dir=tmp_path / "models").kind == "safetensors"  # the intact file still loads


def test_swapped_class_names_in_metadata_json_are_refused(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    edit_json(folder / "metadata.json", class_names=["dog", "cat", "élan"])
    for source in ("cats@latest", str(folder / "weights.pth")):
        with pytest.raises(ArtifactError) as info:
            load_source(source, model_dir=tmp_path / "models")
        message = str(info.value)
        assert 'class_names is ["dog", "cat", "élan"] in metadata.json, expected ["cat", "dog", "élan"]' in message
        assert "another class's label" in message and "Fix:" in message


def test_a_metadata_json_stripped_of_its_hashes_is_refused(tmp_path, small_state, publish_version):
    folder = publish_version(small_state, file_hashes="sha256")  # as publish_version in publish.py marks versions
    data = json.loads((folder / "metadata.json").read_text())
    del data["files"]
    (folder / "metadata.json").write_text(json.dumps(data))
    flip_last_byte(folder / "model.safetensors")
    with pytest.raises(ArtifactError, match="lost its record of file hashes"):
        load_source("cats@v1", model_dir=tmp_path / "models")


def test_a_file_that_was_not_published_is_refused(tmp_path, small_state, publish_version):
    folder = publish_version(small_state)
    save_weights_pth(small_state, folder / "model.pth")
    with pytest.raises(ArtifactError, match=r"model\.pth is not one of the files published in cats@v001"):
        load_source(str(folder / "model.pth"), model_dir=tmp_path)
    assert "model.pth was added after publishing" in " ".join(verify_version(folder).problems)


def test_a_versions_metadata_json_as_weights_points_to_its_folder(tmp_path, small_state, publish_version):
    # It said "metadata.json is not one of the files published ... restore the version from a backup": an intact
    # registry called damaged, for a file that is simply not weights.
    folder = publish_version(small_state)
    with pytest.raises(ArtifactError, match=r"is a JSON text file, not weights.*pass its folder or the reference"):
        load_source(str(folder / "metadata.json"), model_dir=tmp_path)


def test_a_version_from_before_hashes_loads_with_a_warning(tmp_path, small_state, publish_version, caplog):
    published = publish_version(small_state)
    old = tmp_path / "old" / "cats" / "v001"  # as an older retrain left it: no `files` in metadata.json
    shutil.copytree(published, old)
    data = json.loads((old / "metadata.json").read_text())
    del data["files"]
    (old / "metadata.json").write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        artifact = load_source(str(old), model_dir=tmp_path)
    assert torch.equal(artifact.state_dict["fc.weight"], small_state["fc.weight"])
    assert "records no file hashes" in caplog.text
    check = verify_version(old)
    assert check.problems == () and check.unverified is not None
