"""`retrain report RUN_DIR_OR_SOURCE [--out DIR] [--data-root DIR]`: rebuild a run's report.

RUN_DIR is a training run folder (it holds results.json); SOURCE is anything ``model.init_from`` accepts that
carries retrain metadata (a .ckpt, .safetensors, a registry version folder or ``name@v3``). The model is scored
again on the split recorded in its run, so the plots match what training saw.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from retrain.analysis.report_files import HISTORY_FILE, ReportInputs, predict_samples, write_report
from retrain.artifacts.metadata import ArtifactMetadata
from retrain.artifacts.registry import resolve
from retrain.errors import ArtifactError, DataError
from retrain.inference.tta import check_tta
from retrain.model.loading import load_trained, trained_splits
from retrain.utils.io import read_json


def _default_model_dir() -> Path:
    return Path(os.environ.get("RETRAIN_MODEL_DIR") or "models")


def _artifact_folder(source: str, model_dir: Path) -> Path | None:
    """The folder the weights live in (a registry version or a run's checkpoints/), to find a report beside them."""
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        return path if path.is_dir() else path.parent
    return resolve(model_dir, source) if "@" in source else None


def _run_files(run_dir: Path) -> tuple[list[str], list[str]]:
    """The run's command-line overrides and the bad files it skipped."""
    overrides_file, bad_list = run_dir / ".hydra" / "overrides.yaml", run_dir / "bad_files.txt"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    return list(overrides or []), bad_list.read_text().split() if bad_list.is_file() else []


def _unfreeze_milestones(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Epochs at which the unfreeze callback's trainable set grew, from the summary it leaves in results.json."""
    milestones, before = [], None
    for row in (results.get("unfreeze") or {}).get("history") or []:
        added = [stage for stage in row["trainable"] if before is not None and stage not in before]
        if added:
            milestones.append({"epoch": row["epoch"], "stages": added})
        before = row["trainable"]
    return milestones


def _history(folders: list[Path], results: dict[str, Any], meta: ArtifactMetadata) -> dict[str, Any]:
    for folder in folders:
        if (folder / "report" / HISTORY_FILE).is_file():
            return read_json(folder / "report" / HISTORY_FILE)
    # No report beside the model (made without the report callback): what the run and checkpoint recorded.
    history = results.get("history") or meta.history or []
    return {"history": history, "milestones": _unfreeze_milestones(results)}


def rebuild(
    target: str,
    *,
    out: Path | None = None,
    model_dir: Path | None = None,
    data_root: str | None = None,
    split: str = "val",
    top_k: int = 16,
    device: str = "cpu",
    tta: str = "none",
) -> Path:
    """Score a finished run's best checkpoint (or any artifact) again and write its report; returns report.md."""
    model_dir = model_dir or _default_model_dir()
    run_dir: Path | None = None
    results: dict[str, Any] = {}
    source = target
    if Path(target).is_dir() and (Path(target) / "results.json").is_file():
        run_dir = Path(target).resolve()
        results = read_json(run_dir / "results.json")
        source = results.get("best_checkpoint") or results.get("last_checkpoint") or ""
        if not source or not Path(source).is_file():
            raise ArtifactError(
                f"{run_dir} has no checkpoint to score (results.json names {source or 'none'}). Expected a run "
                "that saved checkpoints. Fix: pass a checkpoint or registry version instead."
            )
    net, meta = load_trained(source, model_dir=model_dir)
    tta = check_tta(tta, meta.preprocessing, source=source, option="--tta")
    splits = trained_splits(meta, data_root, source=source, option="--data-root DIR", moved=True)
    if split not in splits.samples:
        raise DataError(f"{splits.root} has no {split!r} split; it has {sorted(splits.samples)}. Fix: --split val.")
    dataset = meta.dataset
    if run_dir is None and dataset.get("split_file") and Path(dataset["split_file"]).is_file():
        run_dir = Path(dataset["split_file"]).parent
    predictions = predict_samples(net, splits.samples[split], meta.preprocessing, device=device, tta=tta)
    folders = [f for f in (run_dir, _artifact_folder(source, model_dir)) if f is not None]
    from_run = bool(results)
    results = results or next((read_json(f / "results.json") for f in folders if (f / "results.json").is_file()), {})
    recorded = _history(folders, results, meta)
    summary = meta.results or results
    overrides, bad_files = _run_files(run_dir) if run_dir else ([], [])
    version = meta.version or 0
    inputs = ReportInputs(
        title=f"Report: {meta.name or 'model'} v{version:03d}",
        class_names=meta.class_names,
        history=recorded["history"],
        milestones=recorded["milestones"],
        predictions=predictions,
        split=split,
        weights=f"`{Path(source).name if Path(source).exists() else source}`"
        + ("" if tta == "none" else f" (tta={tta})"),
        monitor=summary.get("monitor"),
        best_epoch=summary.get("best_epoch"),
        metrics={k: float(v) for k, v in (summary.get("test") or {}).items()},
        overrides=overrides,
        dataset=dataset,
        bad_files=bad_files,
    )
    if out is None:  # a run's report is rebuilt in place; a registry version is never written to
        out = run_dir / "report" if run_dir and from_run else Path("reports") / f"{meta.name or 'model'}-v{version:03d}"
    return write_report(inputs, out, top_k=top_k)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare `retrain report`'s options."""
    parser.add_argument("target", metavar="RUN_DIR_OR_SOURCE", help="a run folder, checkpoint or name@vN")
    parser.add_argument("--out", type=Path, help="report folder (default: RUN_DIR/report, else reports/NAME-vNNN)")
    parser.add_argument("--data-root", help="the image folder, when it moved since training")
    parser.add_argument("--model-dir", type=Path, help="registry folder (default: $RETRAIN_MODEL_DIR or ./models)")
    parser.add_argument("--split", default="val", help="split to score (default: val)")
    parser.add_argument("--top-k", type=int, default=16, help="images in top_losses.png (default: 16)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--tta", default="none", help="test-time augmentation: none, flip or five_crop (probabilities averaged)"
    )


def run(args: argparse.Namespace) -> int:
    """Rebuild the report and print where it went."""
    report = rebuild(
        args.target,
        out=args.out,
        model_dir=args.model_dir,
        data_root=args.data_root,
        split=args.split,
        top_k=args.top_k,
        device=args.device,
        tta=args.tta,
    )
    print(report)
    return 0
