"""Sweep summaries: one row per job of a `-m` run, the best job marked, rebuilt from the job dirs' results.json.

`SweepSummary` (a Hydra callback, see conf/hydra/default.yaml) writes sweep_summary.csv and sweep_summary.md
after every job and at the end of the sweep; `retrain sweeps summarize DIR` rebuilds them. With
`sweep.publish=best` (the default) the jobs keep their models in their run folders and the sweep publishes only the
best job's at its end, so `latest` is the winner and not whichever job ran last.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from retrain.errors import ConfigError, RetrainError
from retrain.utils.hydra import is_multirun
from retrain.utils.io import write_text

log = logging.getLogger("retrain")

SUMMARY_CSV = "sweep_summary.csv"
SUMMARY_MD = "sweep_summary.md"
COLUMNS = ("job", "status", "best", "monitor", "value", "best_epoch", "overrides", "run_dir", "error")
PUBLISH_MODES = ("best", "all", "none")  # sweep.publish: which jobs of a sweep become registry versions


def publish_mode(cfg: DictConfig) -> str:
    """`sweep.publish`, checked: best (only the best job, at the sweep's end), all (every job) or none."""
    mode = str(OmegaConf.select(cfg, "sweep.publish", default="best"))
    if mode not in PUBLISH_MODES:
        raise ConfigError(
            f"sweep.publish={mode} is not a publish mode. Expected one of {', '.join(PUBLISH_MODES)}: best publishes "
            "only the sweep's best job when the sweep ends, all publishes every job, none publishes nothing. "
            "Fix: sweep.publish=best (the default), sweep.publish=all or sweep.publish=none."
        )
    return mode


def publishes_itself(cfg: DictConfig) -> bool:
    """Whether a training run publishes its own version: a single run does; a sweep job only with sweep.publish=all."""
    return not is_multirun() or publish_mode(cfg) == "all"


def keeps_for_sweep(cfg: DictConfig) -> bool:
    """Whether a sweep job keeps its model in its run folder for the sweep to publish (sweep.publish=best)."""
    return is_multirun() and publish_mode(cfg) == "best"


@dataclass(frozen=True)
class Job:
    """What one job of a sweep left behind; status is ok, failed, or missing (no results.json yet)."""

    num: int
    status: str
    overrides: tuple[str, ...]
    run_dir: Path
    monitor: str | None = None
    mode: str | None = None
    value: float | None = None
    best_epoch: int | None = None
    error: str | None = None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The numbered job folders of a sweep, in job order (10 after 9)."""
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def read_job(job_dir: Path) -> Job:
    """One job's row from its results.json and .hydra/overrides.yaml."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = tuple(str(o) for o in OmegaConf.load(overrides_file)) if overrides_file.is_file() else ()
    results_file = job_dir / "results.json"
    if not results_file.is_file():
        return Job(int(job_dir.name), "missing", overrides, job_dir, error="no results.json (killed or running)")
    results = json.loads(results_file.read_text())
    value = results.get("monitor_value")
    return Job(
        num=int(job_dir.name),
        status=str(results.get("status", "ok")),
        overrides=overrides,
        run_dir=job_dir,
        monitor=results.get("monitor"),
        mode=results.get("monitor_mode"),
        value=None if value is None else float(value),
        best_epoch=results.get("best_epoch"),
        error=results.get("error"),
    )


def best_job(jobs: list[Job]) -> Job | None:
    """The ok job with the best finite monitored value (monitor_mode decides max or min); ties go to the first."""
    scored = [job for job in jobs if job.status == "ok" and job.value is not None and math.isfinite(job.value)]
    if not scored:
        return None
    if (scored[0].mode or "max") == "min":
        return min(scored, key=lambda job: job.value or 0.0)
    return max(scored, key=lambda job: job.value or 0.0)


def swept_overrides(jobs: list[Job]) -> dict[int, tuple[str, ...]]:
    """Each job's overrides without those every job shares (data.root=...), so the table shows what was swept."""
    if len(jobs) < 2:
        return {job.num: job.overrides for job in jobs}
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    return {job.num: tuple(o for o in job.overrides if o not in shared) or job.overrides for job in jobs}


def write_summary(sweep_dir: Path) -> tuple[Path, Path]:
    """Write sweep_summary.csv and sweep_summary.md from the job dirs; returns their paths."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d) for d in job_dirs(sweep_dir)] if sweep_dir.is_dir() else []
    if not jobs:
        raise ConfigError(
            f"{sweep_dir} holds no numbered job folders (0/, 1/, ...). Expected the sweep dir that "
            "`python train.py -m ...` printed, e.g. logs/train/multiruns/<name>/<time>. "
            "Fix: pass that folder to `retrain sweeps summarize`."
        )
    best = best_job(jobs)
    shown = swept_overrides(jobs)
    csv_path, md_path = sweep_dir / SUMMARY_CSV, sweep_dir / SUMMARY_MD
    write_text(csv_path, _csv_text(jobs, best, shown))
    write_text(md_path, _markdown(sweep_dir, jobs, best, shown))
    return csv_path, md_path


def _csv_text(jobs: list[Job], best: Job | None, shown: dict[int, tuple[str, ...]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for job in jobs:
        writer.writerow(
            [
                job.num,
                job.status,
                "true" if job is best else "false",
                job.monitor or "",
                "" if job.value is None else repr(job.value),
                "" if job.best_epoch is None else job.best_epoch,
                " ".join(shown[job.num]),
                str(job.run_dir),
                job.error or "",
            ]
        )
    return out.getvalue()


def _markdown(sweep_dir: Path, jobs: list[Job], best: Job | None, shown: dict[int, tuple[str, ...]]) -> str:
    monitor = next((job.monitor for job in jobs if job.monitor), "monitor")
    counts = ", ".join(f"{sum(j.status == s for j in jobs)} {s}" for s in dict.fromkeys(j.status for j in jobs))
    verdict = f"best: job {best.num} ({monitor} = {best.value:.4f}, {best.mode})" if best else "no successful job"
    lines = [
        "# Sweep summary",
        "",
        f"`{sweep_dir}`: {len(jobs)} jobs ({counts}); {verdict}.",
        "",
        *(["Cross-validation (experiment=cv): [cv_summary.md](cv_summary.md).", ""] if _is_cv(sweep_dir) else []),
        f"| job | status | {monitor} | best epoch | overrides | run dir | error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for job in jobs:
        cells = [
            f"**{job.num} (best)**" if job is best else str(job.num),
            job.status,
            "" if job.value is None else f"{job.value:.4f}",
            "" if job.best_epoch is None else str(job.best_epoch),
            " ".join(f"`{o}`" for o in shown[job.num]),
            job.run_dir.name,
            (job.error or "")[:160],
        ]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Keeps sweep_summary.csv/.md of a multirun current, and stops the basic sweeper on `sweep.fail_fast=true`.

    Configured in conf/hydra/default.yaml (`hydra.callbacks`); single runs and DDP's re-launched ranks skip it.
    Hydra turns an exception from a callback into a warning and goes on, so stopping is a SystemExit.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the monitor, the sweeper's settings and `sweep.publish` first: a mistake is one paragraph, before
        any job."""
        from retrain.tasks.guards import check_monitor_modes  # Lightning: only once a sweep starts

        try:
            check_monitor_modes(config)
            OmegaConf.to_container(config.hydra.sweeper, resolve=True)
            publish_mode(config)
            _check_trial_count(config)
        except (InterpolationResolutionError, ConfigError) as error:
            mistake = _retrain_error_behind(error)  # what our resolver (study_storage) raised
            if mistake is None:
                raise
            print(f"\nerror: {mistake}", file=sys.stderr)
            sys.exit(1)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Rewrite the summary after each job, so a long or stopped sweep still has one."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        _, md_path = write_summary(sweep_dir)
        if not _basic_sweeper(config) and _search_failed(config, sweep_dir):
            # Optuna's sweeper would end in its own traceback (no best trial) after the last trial.
            _exit_no_job_succeeded(sweep_dir, md_path)
        fail_fast = OmegaConf.select(config, "sweep.fail_fast", default=False)
        if job_return.status == JobStatus.FAILED and fail_fast and _basic_sweeper(config):
            # The basic sweeper runs the rest of its batch (every job, by default) before it looks at failures.
            # Other sweepers (Optuna) must see the failure themselves, so they can record the trial as failed.
            error = read_job(Path(config.hydra.runtime.output_dir)).error
            print(
                f"\nerror: job {config.hydra.job.num} failed and sweep.fail_fast=true stopped the sweep: {error}. "
                f"The jobs so far are in {md_path}. Fix: correct that job's overrides, or drop "
                "sweep.fail_fast to record failed jobs and go on.",
                file=sys.stderr,
            )
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the final summary and say which job was best."""
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir() or not job_dirs(sweep_dir):
            return
        _, md_path = write_summary(sweep_dir)
        jobs = [read_job(d) for d in job_dirs(sweep_dir)]
        best = best_job(jobs)
        failed = sum(job.status != "ok" for job in jobs)
        best_text = f"best job {best.num}: {best.monitor}={best.value:.4f}" if best else "no job succeeded"
        log.info("sweep summary: %s (%d jobs, %d failed; %s)", md_path, len(jobs), failed, best_text)
        if best is None:
            _exit_no_job_succeeded(sweep_dir, md_path)
        if publish_mode(config) != "best":
            return
        if _worse_than_study(config, best):
            best = None  # a resumed search's earlier, better trial stays `latest`: drop this sweep's kept models
        try:
            published = publish_best(jobs, best)
        except RetrainError as error:  # a full disk, a `latest` that is a real folder...
            print(f"\nerror: the sweep's best job was not published: {error}", file=sys.stderr)
            sys.exit(1)
        if published and best is not None:
            log.info(
                "sweep.publish=best: published job %d as %s@v%03d (%s)",
                best.num,
                published["name"],
                published["version"],
                published["path"],
            )


def publish_best(jobs: list[Job], best: Job | None) -> dict[str, Any] | None:
    """Publish the best job's kept model as the sweep's one registry version, then drop the others' kept models."""
    from retrain.artifacts import publish  # torch: imported only when a sweep has something to publish

    kept = [job for job in jobs if publish.has_kept(job.run_dir)]
    published = publish.publish_kept(best.run_dir) if best is not None and best in kept else None
    for job in kept:
        if job is not best:
            publish.drop_kept(job.run_dir)
    return published


def _check_trial_count(config: DictConfig) -> None:
    """An Optuna search of no trial would end in Optuna's own traceback (no best trial): refuse it first."""
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    if trials is not None and int(trials) < 1:
        raise ConfigError(
            f"hparams_search.n_trials={trials} runs no trial, so the search has nothing to choose from. Expected "
            "1 or more. Fix: hparams_search.n_trials=20."
        )


def _search_failed(config: DictConfig, sweep_dir: Path) -> bool:
    """Whether every trial of this search ended, none succeeded, and the study has no earlier completed trial
    either: Optuna's sweeper would then end in its own traceback (no best trial) instead of saying why."""
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    ended = [job for job in jobs if job.status != "missing"]
    trials = OmegaConf.select(config, "hydra.sweeper.n_trials")
    if trials is None or len(ended) < int(trials) or best_job(jobs) is not None:
        return False
    if not OmegaConf.select(config, "hparams_search.resume", default=False):
        return True
    return _study_best(config) is None


def _study_best(config: DictConfig) -> float | None:
    """The best value of the Optuna study this search adds to (None before its first completed trial)."""
    import optuna  # the `sweep` extra: only an Optuna search gets here

    study = optuna.load_study(study_name=str(config.hydra.sweeper.study_name), storage=config.hydra.sweeper.storage)
    try:
        return float(study.best_value)
    except ValueError:  # optuna's "Record does not exist": no completed trial
        return None


def _exit_no_job_succeeded(sweep_dir: Path, md_path: Path) -> None:
    """A sweep that trained nothing must not exit 0 like one that did: exit 1 with the first job's error and log."""
    jobs = [read_job(d) for d in job_dirs(sweep_dir)]
    first = ([job for job in jobs if job.status != "missing"] or jobs)[0]
    log_file = next(iter(sorted(first.run_dir.glob("*.log"))), first.run_dir)
    print(
        f"\nerror: no job of the sweep succeeded ({len(jobs)} jobs, summary: {md_path}). The first error, job "
        f"{first.num}: {first.error or f'no finite {first.monitor} value'} (its log: {log_file}; the other jobs' "
        f"logs are in their folders under {sweep_dir}). Fix: correct what that error says, then run the sweep again.",
        file=sys.stderr,
    )
    sys.exit(1)


def _worse_than_study(config: DictConfig, best: Job | None) -> bool:
    """Whether a resumed Optuna search's best job is worse than its study's best, an earlier sweep's trial."""
    if best is None or best.value is None or not OmegaConf.select(config, "hparams_search.resume", default=False):
        return False
    study_best = _study_best(config)
    if study_best is None:
        return False
    better = study_best > best.value if best.mode != "min" else study_best < best.value
    if better:
        log.warning(
            "sweep.publish=best: this search's best job %d (%s=%.4f) is worse than the study's best trial "
            "(%s=%.4f, from an earlier sweep of this study), so nothing was published and `latest` stays as it "
            "was. The study's best is %s.",
            best.num, best.monitor, best.value, best.monitor, study_best, _holder(config, study_best),
        )  # fmt: skip
    return better


def _holder(config: DictConfig, value: float) -> str:
    """The registry version that the earlier sweeps of the study published for the job with this value."""
    from retrain.utils.run_dirs import run_results  # torch: only at the end of a resumed search

    study_sweeps = Path(str(config.hydra.sweeper.storage).removeprefix("sqlite:///")).parent.parent
    roots = dict.fromkeys([study_sweeps, Path(config.hydra.sweep.dir).parent])  # resume=PATH: another name's folder
    for results_file in sorted(f for root in roots for f in root.glob("*/*/results.json")):
        results = run_results(results_file.parent)
        registry, job_value = results.get("registry") or {}, results.get("monitor_value")
        if registry and job_value is not None and math.isclose(float(job_value), value, rel_tol=1e-9):
            return f"{registry.get('name')}@v{int(registry['version']):03d} ({registry.get('path')})"
    return f"not among the published jobs under {', '.join(str(root) for root in roots)}"


def _is_cv(sweep_dir: Path) -> bool:
    return (sweep_dir / "cv_summary.md").is_file()  # written by retrain.cv.CVSummary, which then rewrites this


def _retrain_error_behind(error: BaseException) -> RetrainError | None:
    # OmegaConf re-raises a resolver's exception wrapped, once or twice, as the context of its own.
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, RetrainError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _basic_sweeper(config: DictConfig) -> bool:
    return str(config.hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper")


if __name__ == "__main__":  # legacy form of `retrain sweeps summarize DIR`
    from retrain.cli.main import legacy_entry

    sys.exit(legacy_entry("sweeps"))
