"""`python -m retrain.registry` lists versions, shows metadata, and reports mistakes without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from retrain.artifacts.metadata import read_json


def run_cli(*args: str, model_dir) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RETRAIN_MODEL_DIR": str(model_dir)}
    command = [sys.executable, "-m", "retrain.registry", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def test_list_show_and_errors(tmp_path, small_state, publish_version):
    publish_version(small_state)
    publish_version(small_state, parent={"source": "cats@latest", "name": "cats", "version": 1})
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

    shown = run_cli("--model-dir", str(model_dir), "show", "cats@v2", model_dir=tmp_path / "unused")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == read_json(model_dir / "cats" / "v002" / "metadata.json")

    missing = run_cli("show", "cats@v7", model_dir=model_dir)
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: cats has no version 7")
    assert "v001, v002" in missing.stderr
    assert "Traceback" not in missing.stderr
