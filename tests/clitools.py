"""Helpers for tests: tiny ImageFolders made on the fly, and a runner for the CLI as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from PIL import Image

from retrain.utils.hydra import register_resolvers

if TYPE_CHECKING:
    import lightning as L

REPO = Path(__file__).resolve().parents[1]
# The console command a user types, from the environment the tests run in.
RETRAIN = [str(Path(sys.executable).with_name("retrain"))]
CLASSES = ("cat", "dog", "fox")
# Small, fast and deterministic: the settings every CLI test starts from.
FAST = (
    "data.image_size=32",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
)


def write_image(path: Path, label: int, rng: np.random.Generator, size: int = 40) -> None:
    """A noisy image whose dominant colour channel is the label, so a tiny net can learn it quickly."""
    pixels = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    pixels[..., label % 3] += 140
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix == ".png" else "JPEG"
    Image.fromarray(pixels).save(path, fmt)


def make_imagefolder(
    root: Path,
    *,
    layout: str = "split",
    per_class: int = 8,
    classes: tuple[str, ...] = CLASSES,
    seed: int = 0,
) -> Path:
    """Write a tiny ImageFolder: `split` = root/{train,val,test}/<class>/, `folder` = root/<class>/."""
    rng = np.random.default_rng(seed)
    splits = {"train": per_class, "val": max(2, per_class // 2), "test": max(2, per_class // 2)}
    for label, name in enumerate(classes):
        if layout == "folder":
            for i in range(per_class * 2):
                write_image(root / name / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", label, rng)
            continue
        for split, count in splits.items():
            for i in range(count):
                write_image(root / split / name / f"{i:03d}.{'png' if i % 3 == 0 else 'jpg'}", label, rng)
    return root


@dataclass
class CliResult:
    """What a CLI run left: exit code, output, and the folder it ran in."""

    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    first: dict | None = None  # a fixture may keep the results of its own run here

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def runs(self, task: str = "train") -> list[Path]:
        """Every single-run directory under logs/<task>/runs, oldest first."""
        return sorted((self.cwd / "logs" / task / "runs").glob("*/*"))

    def results(self, task: str = "train") -> dict:
        """results.json of the newest run, or of the run it went on with (`ckpt_path=last`: continued_in.txt)."""
        newest = self.runs(task)[-1]
        continued = newest / "continued_in.txt"
        run_dir = Path(continued.read_text().strip()) if continued.is_file() else newest
        return json.loads((run_dir / "results.json").read_text())


def run_cli(
    script: str, *overrides: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300
) -> CliResult:
    """Run `python <script> <overrides>` from `cwd` exactly as a user would (logs/ and models/ land in cwd)."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    if env and "HYDRA_FULL_ERROR" in env:
        full_env["HYDRA_FULL_ERROR"] = env["HYDRA_FULL_ERROR"]
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr, cwd)


def assert_ok(result: CliResult) -> None:
    """Fail with the CLI's own output when it did not exit 0."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.output[-6000:]}"


def composed(tmp_path: Path, *overrides: str, config: str = "train") -> DictConfig:
    """The real config with overrides, as Hydra would hand it to the task, writing under tmp_path."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config, overrides=[f"paths.root_dir={tmp_path}", *overrides], return_hydra_config=True)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run: the task sees its config, Hydra's own node lives in HydraConfig
    return cfg


def quiet_trainer(**settings: Any) -> L.Trainer:
    """A CPU Trainer that writes and prints nothing, for tests that fit a module in-process; `settings` add to it."""
    import lightning  # here: the CLI tests that import this module never pay for Lightning

    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    return lightning.Trainer(accelerator="cpu", enable_model_summary=False, **{**quiet, **settings})


def save_random_model(path: Path, seed: int = 0) -> Path:
    """A random 3-class ResNet18 for 32 px images as .safetensors, with the metadata eval and predict read."""
    import torch  # here, as above

    from retrain.artifacts.formats import save_safetensors
    from retrain.model.resnet import build_resnet

    torch.manual_seed(seed)
    preprocessing = {
        "image_size": 32,
        "resize": 37,
        "crop": 32,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    meta = {"arch": "resnet18", "class_names": list(CLASSES), "preprocessing": preprocessing}
    save_safetensors(build_resnet("resnet18", len(CLASSES)).state_dict(), meta, path)
    return path
