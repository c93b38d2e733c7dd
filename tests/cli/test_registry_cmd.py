"""`retrain registry` lists versions, shows metadata, and reports mistakes without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from clitools import RETRAIN

from retrain.utils.io import read_json


def run_cli(*args: str, model_dir) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETRAIN_MODEL_DIR": str(model_dir)}
    command = [*RETRAIN, "registry", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def test_list_show_and_errors(tmp_path, small_state, publish_version):
    publish_version(small_state)
    results = {"monitor": "val/acc", "monitor_value": 0.8125, "best_epoch": 3, "test": {}}
    publish_version(small_state, parent={"source": "cats@latest", "name": "cats", "version": 1}, results=results)
    model_dir = tmp_path / "models"

    listed = run_cli("list", model_dir=model_dir)  # the model dir comes from RETRAIN_MODEL_DIR
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0].strip() == "cats"
    v1 = next(line for line in lines if "v001" in line)
    v2 = next(line for line in lines if "v002" in line)
    assert "(latest)" in v2 and "(latest)" not in v1
    assert "2025-01-02 03:04" in v2
    assert "0.7500" in v2 and "0.5000" in v2  # val/acc and test/acc columns
    assert "cats@v001" in v2
    assert "3: cat, dog, élan" in v2 and "val/acc 0.8125" in v2  # classes, and the monitored best value

    shown = run_cli("--model-dir", str(model_dir), "show", "cats@v2", model_dir=tmp_path / "unused")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == read_json(model_dir / "cats" / "v002" / "metadata.json")

    missing = run_cli("show", "cats@v7", model_dir=model_dir)
    assert missing.returncode == 1  # a user mistake, as in every retrain command
    assert missing.stderr.startswith("error: cats has no version 7")
    assert "v001, v002" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_verify_checks_one_version_or_the_whole_registry(tmp_path, small_state, publish_version):
    publish_version(small_state)
    v2 = publish_version(small_state)
    publish_version(small_state, name="dogs")
    model_dir = tmp_path / "models"
    intact = run_cli("verify", model_dir=model_dir)
    assert intact.returncode == 0, intact.stderr
    assert [line.split()[:2] for line in intact.stdout.splitlines()] == [
        ["ok", "cats@v001:"],
        ["ok", "cats@v002:"],
        ["ok", "dogs@v001:"],
    ]

    metadata = json.loads((v2 / "metadata.json").read_text())
    (v2 / "metadata.json").write_text(json.dumps({**metadata, "class_names": ["dog", "cat", "élan"]}))
    changed = run_cli("verify", model_dir=model_dir)
    assert changed.returncode == 1
    assert "FAILED      cats@v002" in changed.stdout and "ok          dogs@v001" in changed.stdout
    assert 'class_names is ["dog", "cat", "élan"] in metadata.json, expected ["cat", "dog", "élan"]' in changed.stdout
    assert changed.stderr.startswith("error: 1 of 3 versions") and "cats@v002" in changed.stderr
    assert "Fix:" in changed.stderr and "Traceback" not in changed.stderr
    assert run_cli("verify", "cats@v1", model_dir=model_dir).returncode == 0  # one version: v001 is intact
    assert run_cli("verify", "cats@v2", model_dir=model_dir).returncode == 1


def test_old_python_m_forms_still_work_and_name_the_new_command(tmp_path, small_state, publish_version):
    publish_version(small_state)
    env = {**os.environ, "RETRAIN_MODEL_DIR": str(tmp_path / "models")}
    old = subprocess.run(
        [sys.executable, "-m", "retrain.registry", "list"], capture_output=True, text=True, env=env, check=False
    )
    assert old.returncode == 0, old.stderr
    assert "v001" in old.stdout
    assert "now `retrain registry`" in old.stderr


def test_top_level_help_lists_every_command() -> None:
    shown = subprocess.run([*RETRAIN, "--help"], capture_output=True, text=True, check=False)
    assert shown.returncode == 0
    for command in ("registry", "report", "sweeps", "validate", "demo-data"):
        assert command in shown.stdout
    unknown = subprocess.run([*RETRAIN, "registri"], capture_output=True, text=True, check=False)
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr
