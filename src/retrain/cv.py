"""k-fold cross-validation: each fold's out-of-fold predictions, the sweep's summary, and the refit on the whole pool.

`python train.py -m experiment=cv data.root=DIR` runs one job per `data.fold` (conf/experiment/cv.yaml). Each fold
job writes oof_predictions.csv: its val images, predicted by its best checkpoint. When the sweep ends, `CVSummary`
(a Hydra callback) writes into the sweep folder:

- cv_summary.csv / .md / .json: per fold the monitored value and the best epoch, then mean and std over the folds;
- oof_predictions.csv: every train-pool image once, predicted by the one fold model that did not train on it, and
  oof_report/ (confusion matrix, per-class table, top losses) over the whole pool;
- with `cv.refit=true`: refit/, one model trained on the whole pool for the folds' mean best epoch count, published
  with the CV mean and std and the fold runs in its metadata (`cv`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from retrain.errors import ArtifactError, ConfigError
from retrain.utils.io import read_json, write_text

if TYPE_CHECKING:  # torch and Lightning: imported where a fold's predictions are made, not by every sweep
    import lightning as L

    from retrain.analysis.report_files import Predictions
    from retrain.data.datamodule import ImageFolderDataModule
    from retrain.data.splits import DataSplits
    from retrain.model.module import ClassifierModule

log = logging.getLogger("retrain")

OOF_FILE = "oof_predictions.csv"
SUMMARY_CSV, SUMMARY_MD, SUMMARY_JSON = "cv_summary.csv", "cv_summary.md", "cv_summary.json"
OOF_REPORT = "oof_report"
REFIT_DIR = "refit"


# --- in a fold's training run -----------------------------------------------------------------------------------


def fold_outputs(
    run_dir: Path,
    splits: DataSplits,
    callbacks: list[L.Callback],
    module: ClassifierModule,
    datamodule: ImageFolderDataModule,
) -> dict[str, Any]:
    """results.json's `cv` for a fold run (and a refit): which fold; a fold also writes its val predictions."""
    record = {k: v for k, v in splits.cv.items() if k != "assignment"}
    if not splits.samples.get("val"):  # the refit holds nothing out
        return record
    predictions = _val_predictions(callbacks, module, datamodule)
    write_text(run_dir / OOF_FILE, oof_csv(predictions, module.class_names, splits.cv["fold"]))
    return {**record, "oof_predictions": str(run_dir / OOF_FILE)}


def _val_predictions(
    callbacks: list[L.Callback], module: ClassifierModule, datamodule: ImageFolderDataModule
) -> Predictions:
    """The val split scored with the weights train.py tests and publishes: the report's scores when it made them."""
    from retrain.analysis.report_files import predict_samples
    from retrain.callbacks.run_report import RunReport

    for callback in callbacks:
        if isinstance(callback, RunReport) and callback.inputs is not None and callback.split == "val":
            return callback.inputs.predictions
    device = next(module.model.parameters()).device
    return predict_samples(module.model, datamodule.splits.samples["val"], datamodule.preprocessing, device=device)


def oof_csv(predictions: Predictions, class_names: list[str], fold: int) -> str:
    """Rows of path, true label, predicted label, fold and one probability column per class."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["path", "label", "predicted", "fold", *(f"prob_{name}" for name in class_names)])
    for path, label, probs in zip(predictions.paths, predictions.labels, predictions.probs, strict=True):
        predicted = class_names[int(probs.argmax())]
        writer.writerow([path, class_names[int(label)], predicted, fold, *(f"{float(p):.6f}" for p in probs)])
    return out.getvalue()


def refit_record(sweep_dir: Path) -> dict[str, Any]:
    """What a refit's metadata carries (`cv`): the CV sweep, how many folds finished, its monitor's mean and std, and
    the fold runs."""
    path = Path(sweep_dir) / SUMMARY_JSON
    if not path.is_file():
        raise ArtifactError(
            f"cv.refit_from={sweep_dir} holds no {SUMMARY_JSON}. Expected the folder of a finished "
            "`python train.py -m experiment=cv` sweep. Fix: point cv.refit_from at that sweep folder."
        )
    summary = read_json(path)
    keys = ("sweep_dir", "folds", "finished", "monitor", "mean", "std", "refit_epochs", "fold_runs")
    return {key: summary[key] for key in keys}


# --- when the sweep starts ----------------------------------------------------------------------------------------

ONE_CV_PER_SETTING = (
    "Fix: run one CV per setting (python train.py experiment=cv data.root=DIR model.lr=0.01, then model.lr=0.001), "
    "or search with hparams_search=optuna over one fixed fold (python train.py hparams_search=optuna data.root=DIR "
    "data.fold=0, without experiment=cv)."
)


def check_fold_sweep(config: DictConfig) -> None:
    """A CV sweeps data.fold alone, each fold once: jobs of other settings would be averaged into one CV."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = str(config.hydra.sweeper.get("_target_", ""))
    if not sweeper.endswith(".BasicSweeper"):
        raise ConfigError(
            f"experiment=cv with the sweeper {sweeper} (hparams_search=optuna?): it would sample data.fold as one "
            "more hyperparameter, so the CV would average folds trained with different settings, and its best "
            f"trial would be one fold. Expected experiment=cv alone, which sweeps data.fold. {ONE_CV_PER_SETTING}"
        )
    parsed = OverridesParser.create().parse_overrides([str(o) for o in config.hydra.overrides.task])
    swept = [str(o.input_line) for o in parsed if o.is_sweep_override() and o.get_key_element() != "data.fold"]
    swept += [f"hydra.sweeper.params.{key}" for key in config.hydra.sweeper.get("params") or {} if key != "data.fold"]
    if swept:
        raise ConfigError(
            f"experiment=cv also sweeps {', '.join(swept)}: the CV summary, its out-of-fold predictions and the "
            "refit would mix the folds of every setting into one CV. Expected data.fold to be the only swept key. "
            + ONE_CV_PER_SETTING
        )


# --- when the sweep ends ------------------------------------------------------------------------------------------


def _fold_of(job_dir: Path, cv: dict[str, Any]) -> Any:
    """The fold a job was asked for (its data.fold override), so a job that failed early is labelled too."""
    from retrain.sweeps import read_job

    for override in read_job(job_dir).overrides:
        key, _, value = override.partition("=")
        if key == "data.fold":
            return int(value) if value.lstrip("-").isdigit() else value
    return cv.get("fold", int(job_dir.name))


def read_folds(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per fold job: fold, status, monitored value, best epoch, run folder and its predictions file."""
    from retrain.sweeps import job_dirs

    rows = []
    for job_dir in job_dirs(sweep_dir):
        results = read_json(job_dir / "results.json") if (job_dir / "results.json").is_file() else {}
        cv = results.get("cv") or {}
        value = results.get("monitor_value")
        rows.append(
            {
                "fold": _fold_of(job_dir, cv),
                "status": results.get("status", "missing"),
                "monitor": results.get("monitor"),
                "value": None if value is None else float(value),
                "best_epoch": results.get("best_epoch"),
                "run_dir": str(job_dir),
                "oof": cv.get("oof_predictions"),
                "error": results.get("error"),
            }
        )
    return rows


def check_one_job_per_fold(rows: list[dict[str, Any]]) -> None:
    """Each fold once: two jobs of one fold (another setting, or a fold listed twice) are not one CV."""
    jobs: dict[Any, list[str]] = {}
    for row in rows:
        jobs.setdefault(row["fold"], []).append(Path(row["run_dir"]).name)
    repeated = {fold: names for fold, names in jobs.items() if len(names) > 1}
    if repeated:
        listed = "; ".join(f"fold {fold} in jobs {', '.join(names)}" for fold, names in repeated.items())
        raise ConfigError(
            f"{Path(rows[0]['run_dir']).parent} ran a fold more than once ({listed}), so it is not one CV: its "
            "mean, out-of-fold predictions and refit would mix the jobs. Expected each fold once. " + ONE_CV_PER_SETTING
        )


def _finished(row: dict[str, Any]) -> bool:
    return row["status"] == "ok" and row["value"] is not None and math.isfinite(row["value"])


def unfinished_folds(rows: list[dict[str, Any]], folds: int, log_name: str) -> list[str]:
    """What keeps the CV from being complete: each failed fold with its log and error, and folds that never ran."""
    problems = [
        f"fold {row['fold']} {row['status']} (log: {Path(row['run_dir']) / log_name}): "
        + (row["error"] or "no value").rstrip(".")
        for row in rows
        if not _finished(row)
    ]
    ran = {row["fold"] for row in rows}
    missing = [str(fold) for fold in range(folds) if fold not in ran]
    if missing:
        problems.append(f"{'folds' if len(missing) > 1 else 'fold'} {', '.join(missing)} did not run")
    return problems


def summarize(sweep_dir: Path, rows: list[dict[str, Any]], folds: int) -> dict[str, Any]:
    """Mean and sample standard deviation of the monitored value over the folds that finished, and the refit's
    epoch count: the folds' mean number of epochs up to and including their best one."""
    ok = [row for row in rows if _finished(row)]
    values = [row["value"] for row in ok]
    epochs = [row["best_epoch"] + 1 for row in ok if row["best_epoch"] is not None]
    return {
        "sweep_dir": str(sweep_dir),
        "folds": folds,
        "finished": len(ok),
        "monitor": next((row["monitor"] for row in rows if row["monitor"]), None),
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "refit_epochs": max(1, round(statistics.fmean(epochs))) if epochs else None,
        "fold_runs": [row["run_dir"] for row in rows],
        "rows": rows,
    }


def write_summary(sweep_dir: Path, summary: dict[str, Any]) -> Path:
    """cv_summary.csv, .md and .json in the sweep folder; returns the .md."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["fold", "status", "monitor", "value", "best_epoch", "run_dir"])
    for row in summary["rows"]:
        value = "" if row["value"] is None else repr(row["value"])
        writer.writerow(
            [row["fold"], row["status"], row["monitor"] or "", value, _blank(row["best_epoch"]), row["run_dir"]]
        )
    for name in ("mean", "std"):
        writer.writerow([name, "", summary["monitor"] or "", _blank(summary[name]), "", ""])
    write_text(sweep_dir / SUMMARY_CSV, out.getvalue())
    write_text(sweep_dir / SUMMARY_JSON, json.dumps(summary, indent=2) + "\n")
    path = sweep_dir / SUMMARY_MD
    write_text(path, _markdown(summary))
    return path


def _blank(value: Any) -> str:
    return "" if value is None else str(value)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _markdown(summary: dict[str, Any]) -> str:
    monitor = summary["monitor"] or "monitor"
    mean, std = summary["mean"], summary["std"]
    verdict = f"**{monitor} = {_fmt(mean)} ± {_fmt(std)}** (mean ± sample std over {summary['finished']} folds)"
    lines = [
        "# Cross-validation summary",
        "",
        f"`{summary['sweep_dir']}`: {summary['folds']} folds, {summary['finished']} finished; {verdict}.",
        "",
        f"| fold | status | {monitor} | best epoch | run dir |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in summary["rows"]:
        run = Path(row["run_dir"]).name
        lines.append(
            f"| {row['fold']} | {row['status']} | {_fmt(row['value'])} | {_blank(row['best_epoch'])} | {run} |"
        )
    lines += [f"| **mean** | | {_fmt(mean)} | | |", f"| **std** | | {_fmt(std)} | | |", ""]
    oof = summary.get("oof")
    if oof:
        lines.append(
            f"Out-of-fold predictions: [{OOF_FILE}]({OOF_FILE}) ({oof['rows']} of {oof['pool']} pool images); "
            f"accuracy {_fmt(oof['acc'])}, balanced accuracy {_fmt(oof['bal_acc'])}; "
            f"report: [{OOF_REPORT}/report.md]({OOF_REPORT}/report.md)."
        )
        lines.append("")
    refit = summary.get("refit")
    if refit:
        lines.append(f"Refit on the whole pool for {summary['refit_epochs']} epochs: {refit}")
    elif summary.get("refit_command"):
        lines += ["Refit on the whole pool (cv.refit=true runs it at the end of the sweep):", "", "```"]
        lines += [summary["refit_command"], "```"]
    return "\n".join(lines) + "\n"


def merge_oof(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """oof_predictions.csv of the sweep: the fold files one after the other (each image once); None without any."""
    files = [Path(row["oof"]) for row in rows if row["oof"] and Path(row["oof"]).is_file()]
    if not files:
        return None
    header, body = None, []
    for path in files:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            body += list(reader)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header or [])
    writer.writerows(body)
    path = sweep_dir / OOF_FILE
    write_text(path, out.getvalue())
    return path


def oof_report(sweep_dir: Path, oof_path: Path, pool: int, overrides: list[str]) -> dict[str, Any]:
    """The report over the out-of-fold predictions (confusion matrix, per-class table, top losses); its numbers."""
    import numpy as np

    from retrain.analysis.report_files import Predictions, ReportInputs, write_report
    from retrain.analysis.tta_gain import accuracies

    with open(oof_path, newline="") as f:
        rows = list(csv.DictReader(f))
    class_names = [key.removeprefix("prob_") for key in rows[0] if key.startswith("prob_")] if rows else []
    index = {name: i for i, name in enumerate(class_names)}
    probs = np.array([[float(row[f"prob_{name}"]) for name in class_names] for row in rows])
    labels = np.array([index[row["label"]] for row in rows])
    predictions = Predictions(probs, labels, [row["path"] for row in rows])
    inputs = ReportInputs(
        title="Out-of-fold report",
        class_names=class_names,
        history=[],
        predictions=predictions,
        split="out-of-fold",
        weights="the fold model that did not train on each image (its best checkpoint)",
        overrides=overrides,
    )
    write_report(inputs, sweep_dir / OOF_REPORT)
    return {"rows": len(rows), "pool": pool, **accuracies(probs, labels)}


def refit_command(config: DictConfig, sweep_dir: Path, epochs: int, has_test: bool) -> list[str]:
    """`python train.py` with the sweep's overrides, on the whole pool (data.fold=refit) for `epochs` epochs.

    Nothing is held out, so no epoch is chosen by a monitor (the last is kept) and the report scores the test
    split (none without one); early stopping, which watches val, is dropped.
    """
    task = [
        o for o in config.hydra.overrides.task if not o.startswith(("data.fold=", "cv.refit", "trainer.max_epochs="))
    ]
    callbacks = config.get("callbacks") or {}
    extra = ["data.fold=refit", f"trainer.max_epochs={epochs}", f"cv.refit_from={sweep_dir}", "hydra.mode=RUN"]
    if "checkpoint" in callbacks:
        extra += ["callbacks.checkpoint.monitor=null", "callbacks.checkpoint.save_top_k=1"]
    if "report" in callbacks:
        extra.append("++callbacks.report.split=test" if has_test else "~callbacks.report")
    if "early_stopping" in callbacks:
        extra.append("~callbacks.early_stopping")
    return [sys.executable, sys.argv[0], *task, *extra, f"hydra.run.dir={sweep_dir / REFIT_DIR}"]


def _has_test(rows: list[dict[str, Any]]) -> bool:
    split_files = [Path(row["run_dir"]) / "split.json" for row in rows]
    return any("test" in read_json(path).get("samples", {}) for path in split_files if path.is_file())


def _pool_size(rows: list[dict[str, Any]]) -> int:
    split_files = [Path(row["run_dir"]) / "split.json" for row in rows]
    return next((len(read_json(p).get("cv", {}).get("assignment", {})) for p in split_files if p.is_file()), 0)


class CVSummary(Callback):
    """At the end of a CV sweep: cv_summary.*, oof_predictions.csv with its report, and the refit (cv.refit=true).

    Configured by conf/experiment/cv.yaml (`hydra.callbacks.cv_summary`); runs after the sweep summary, which it
    then rewrites so that it links cv_summary.md.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Refuse, before any fold trains, a sweep that would mix other settings into the CV."""
        try:
            check_fold_sweep(config)
        except ConfigError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Summarize the folds, merge their predictions, report on them, and refit when asked."""
        from retrain import sweeps

        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() or not sweeps.job_dirs(sweep_dir):
            return
        rows = read_folds(sweep_dir)
        try:
            check_one_job_per_fold(rows)
        except ConfigError as error:
            print(f"\nerror: {error}", file=sys.stderr)
            sys.exit(1)
        summary = summarize(sweep_dir, rows, int(config.data.folds))
        oof_path = merge_oof(sweep_dir, rows)
        if oof_path is not None:
            summary["oof"] = oof_report(sweep_dir, oof_path, _pool_size(rows), list(config.hydra.overrides.task))
        if summary["refit_epochs"] is not None:
            command = refit_command(config, sweep_dir, summary["refit_epochs"], _has_test(rows))
            summary["refit_command"] = shlex.join(["python", *command[1:]])
        md_path = write_summary(sweep_dir, summary)
        sweeps.write_summary(sweep_dir)  # now with the link to cv_summary.md
        log.info(
            "cv summary: %s (%s = %s ± %s)", md_path, summary["monitor"], _fmt(summary["mean"]), _fmt(summary["std"])
        )
        if not config.cv.refit:
            return
        problems = unfinished_folds(rows, int(config.data.folds), f"{config.task_name}.log")
        if problems or summary["refit_epochs"] is None:
            print(
                f"\nerror: cv.refit=true, but {summary['finished']} of {summary['folds']} folds finished, so the "
                "refit was not trained: its epoch count and the CV mean in its metadata would come from part of the "
                f"pool's folds. {'; '.join(problems)}. Fix: correct what stopped those folds and run the CV again; "
                f"to refit anyway, run the command in {md_path}.",
                file=sys.stderr,
            )
            sys.exit(1)
        log.info("cv.refit=true: training on the whole pool for %d epochs", summary["refit_epochs"])
        done = subprocess.run(command, check=False)
        results_file = sweep_dir / REFIT_DIR / "results.json"
        if done.returncode != 0 or not results_file.is_file():
            print(
                f"\nerror: the refit failed (exit {done.returncode}); its log is in {sweep_dir / REFIT_DIR}.",
                file=sys.stderr,
            )
            sys.exit(1)
        published = (read_json(results_file).get("registry") or {}).get("path")
        summary["refit"] = f"[{REFIT_DIR}/]({REFIT_DIR}/)" + (f", published as `{published}`" if published else "")
        write_summary(sweep_dir, summary)
