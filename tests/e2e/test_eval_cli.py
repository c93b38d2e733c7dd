"""eval.py as a user runs it on a flat folder (split automatically): each line once, none of Lightning's adverts or
deprecation noise, the split described as it is (no `<root>/test` folder that does not exist), and where the
results went."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import assert_ok, make_imagefolder, run_cli, save_random_model

pytestmark = pytest.mark.e2e


def test_eval_on_an_automatic_split_prints_each_line_once_and_says_where_results_went(tmp_path: Path) -> None:
    root = make_imagefolder(tmp_path / "flat", layout="folder", per_class=5)
    save_random_model(tmp_path / "model.safetensors")
    result = run_cli(
        "eval.py",
        f"ckpt_path={tmp_path / 'model.safetensors'}",
        f"data.root={root}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "data.num_workers=0",
        cwd=tmp_path,
        env={"PYTHONWARNINGS": "default"},  # warnings shown as Python shows them by default
    )
    assert_ok(result)
    output = result.output
    assert output.count("GPU available: False") == 1, output
    assert "litlogger" not in output and "deprecated" not in output, output
    assert not (root / "test").exists() and f"{root}/test" not in output
    assert f"on the test split of {root} (10% of each class folder, drawn with data.split_seed=0) (3 images)" in output
    results_path = result.runs("eval")[-1] / "results.json"
    assert f"results: {results_path}" in output
    assert json.loads(results_path.read_text())["num_images"] == 3
