"""Export: one artifact -> TorchScript, torch.export, ONNX and int8 files, each verified and measured on real images."""

from __future__ import annotations

import importlib.util
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from retrain.artifacts import registry
from retrain.artifacts.metadata import Preprocessing
from retrain.data.datamodule import ImageListDataset, default_num_workers
from retrain.data.splits import DataSplits, Sample
from retrain.data.transforms import eval_transforms
from retrain.errors import ArtifactError, ConfigError, DataError, RegistryError
from retrain.export.benchmark import INT8_ACCURACY_CHECK, REPORT_FILE, Targets, build_report, table
from retrain.export.program import export_program
from retrain.export.quantize import quantize_ptq, save_int8
from retrain.export.torchscript import export_torchscript
from retrain.inference.deploy_info import deploy_info, to_props, write_sidecar
from retrain.inference.runtimes import FILE_NAMES
from retrain.model.loading import load_trained, trained_splits
from retrain.tasks.common import split_options
from retrain.utils.cli import set_on_command_line
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json

log = logging.getLogger("retrain")

FORMATS = tuple(FILE_NAMES)
# The `export` extra's packages each format needs beyond torch.
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "int8": ("torchao",)}


def export(cfg: DictConfig) -> dict[str, Any]:
    """Write the requested formats, verify and time each through its own runtime, and write export_report.json."""
    formats = _formats(cfg.formats)
    _check_counts(cfg.export)
    if cfg.export.bench.threads:
        torch.set_num_threads(int(cfg.export.bench.threads))
    source = str(cfg.ckpt_path)
    model_dir = Path(cfg.paths.model_dir)
    model, meta = load_trained(source, model_dir=model_dir, allow_pickle=cfg.allow_pickle)
    info = deploy_info(meta, source)
    props = to_props(info)
    pre = meta.preprocessing
    splits = trained_splits(meta, cfg.data.root, source=source, **split_options(cfg.data))
    out_dir = _out_dir(cfg, source, model_dir, HydraConfig.get().overrides.task)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Batch 2: torch.export specializes sizes 0 and 1, which would fix the batch axis.
    example = torch.randn(2, 3, pre.crop, pre.crop, generator=torch.Generator().manual_seed(cfg.seed))

    files: dict[str, Path] = {}
    for fmt in formats:
        path = out_dir / FILE_NAMES[fmt]
        log.info("exporting %s -> %s", fmt, path)
        if fmt == "torchscript":
            export_torchscript(model, example, path, props)
        elif fmt == "export":
            export_program(model, example, path, props)
        elif fmt == "onnx":
            from retrain.export.onnx import export_onnx  # here: onnx is an optional extra

            export_onnx(model, example, path, props, opset=int(cfg.export.onnx_opset))
        else:
            calibration = _images(_loader(cfg, _subset(splits, "train", cfg.export.calib_images, cfg.seed), pre))
            save_int8(quantize_ptq(model, calibration, example), example, path, props)
        files[fmt] = path
    sidecar = write_sidecar(out_dir, info)

    val = _loader(cfg, _subset(splits, "val", cfg.export.val_images, cfg.seed), pre)
    targets = Targets(**OmegaConf.to_container(cfg.export.targets))  # type: ignore[arg-type]
    report = build_report(
        model, info, files, val, warmup=cfg.export.bench.warmup, runs=cfg.export.bench.runs, targets=targets
    )
    report.update({"source": source, "out_dir": str(out_dir), "preprocessing_file": str(sidecar)})
    write_json(out_dir / REPORT_FILE, report)
    _warn_int8_accuracy(report)
    problem = _verification_problem(report, targets)
    results = {"status": "failed" if problem else "ok", **report, "report_file": str(out_dir / REPORT_FILE)}
    write_json(output_dir() / "results.json", results)
    print(f"\n{table(report)}\n\nexports: {out_dir}\nreport:  {out_dir / REPORT_FILE}", flush=True)
    if problem:
        raise ArtifactError(problem)
    return results


def _formats(requested: Any) -> list[str]:
    names = [requested] if isinstance(requested, str) else list(requested or [])
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ConfigError(
            f"formats={names} {'names unknown formats ' + str(unknown) if unknown else 'is empty'}; expected a "
            f"list of {list(FORMATS)}. Fix: e.g. formats=[torchscript,export,onnx,int8] or formats=[onnx]."
        )
    missing = [pkg for name in names for pkg in NEEDS.get(name, ()) if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ConfigError(
            f"formats={names} needs the packages {sorted(set(missing))}, which are not installed. "
            "Fix: pip install -e '.[export]' (or leave those formats out)."
        )
    return list(dict.fromkeys(names))


def _check_counts(settings: DictConfig) -> None:
    """Refuse counts that would measure nothing, or fail later as a traceback from torch's DataLoader."""
    counts = {  # key: (null allowed, what it counts, the fix)
        "val_images": (
            True,
            "validation images that verify and score every format (a check measured on none proves nothing)",
            "null (all of them) or 200",
        ),
        "calib_images": (True, "training images that calibrate int8", "256"),
        "batch_size": (False, "images per batch", "32"),
    }
    for key, (nullable, what, fix) in counts.items():
        value = settings[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"export.{key}={value}; expected 1 or more {what}. Fix: export.{key}={fix}.")


def _out_dir(cfg: DictConfig, source: str, model_dir: Path, overrides: list[str]) -> Path:
    """The registry version's exports/ folder when SOURCE is a version (an `export.out_dir` given on the command
    line is then set aside with a warning: it used to be ignored in silence), else export.out_dir."""
    path = Path(source).expanduser()
    if path.is_file():
        path = path.parent
    elif not path.is_dir():
        try:
            path = registry.resolve(model_dir, source)
        except RegistryError:  # not a registry reference (e.g. torchvision weights)
            return Path(str(cfg.export.out_dir)).expanduser().resolve()
    if registry.VERSION_DIR_RE.fullmatch(path.name) and (path / registry.METADATA_FILE).is_file():
        exports = path.resolve() / "exports"
        if set_on_command_line(overrides, "export.out_dir"):
            log.warning(
                "export.out_dir=%s is set aside: %s is a registry version, whose exports go to its own folder %s, "
                "where serve.py and predict.py find them. Fix: to write them elsewhere, copy them from there, or "
                "export a weights file from outside the registry.",
                cfg.export.out_dir,
                source,
                exports,
            )
        return exports
    return Path(str(cfg.export.out_dir)).expanduser().resolve()


def _subset(splits: DataSplits, split: str, limit: int | None, seed: int) -> list[Sample]:
    """Up to `limit` samples of a split, drawn with a fixed seed so every class is represented."""
    samples = list(splits.samples.get(split) or [])
    if not samples:
        raise DataError(f"{splits.root} has no {split!r} images; export needs train (int8 calibration) and val images.")
    if limit is not None and limit < len(samples):
        samples = random.Random(seed).sample(samples, int(limit))
    return samples


def _loader(cfg: DictConfig, samples: list[Sample], pre: Preprocessing) -> DataLoader:
    workers = default_num_workers() if cfg.data.num_workers is None else int(cfg.data.num_workers)
    min_size = pre.resize if cfg.data.fast_decode else None
    dataset = ImageListDataset(samples, eval_transforms(pre), min_size)
    return DataLoader(dataset, batch_size=int(cfg.export.batch_size), num_workers=workers)


def _images(loader: DataLoader) -> Iterator[torch.Tensor]:
    for images, _ in loader:
        yield images


def _warn_int8_accuracy(report: dict[str, Any]) -> None:
    """Log a warning when the int8 file written loses more validation accuracy than its target allows."""
    check = next((c for c in report["targets"] if c["name"] == INT8_ACCURACY_CHECK and not c["met"]), None)
    if check is None:
        return
    eager, int8 = report["formats"]["eager"], report["formats"]["int8"]
    log.warning(
        "the int8 model lost %.1f points of validation accuracy (%.1f%% -> %.1f%% on %d images; target %s), and it "
        "was written anyway: %s. Fix: calibrate on more training images (export.calib_images=256 or more), or "
        "fine-tune it with quantization-aware training (python train.py experiment=qat model.init_from=%s "
        "data.root=DIR).",
        check["measured"],
        eager["val_acc"] * 100,
        int8["val_acc"] * 100,
        int8["val_images"],
        check["target"],
        int8["file"],
        report["source"],
    )


def _verification_problem(report: dict[str, Any], targets: Targets) -> str | None:
    """Why the ONNX export failed its verification against PyTorch, or None when it passed (or was not asked for)."""
    onnx = report["formats"].get("onnx")
    if not onnx or onnx["max_abs_logit_diff"] <= targets.onnx_max_abs_diff:
        return None
    return (
        f"The ONNX export failed verification: its logits differ from PyTorch's by up to "
        f"{onnx['max_abs_logit_diff']:.2e} on {onnx['val_images']} validation images, expected <= "
        f"{targets.onnx_max_abs_diff:g}. The file and the report were written for inspection. Fix: try another "
        "export.onnx_opset, or report the model and the versions in the report's `machine` section."
    )
