"""Train: data -> weights source -> surgery -> Trainer.fit -> test on the best checkpoint -> publish a version."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from retrain.analysis.tracking import log_run_facts
from retrain.artifacts import registry
from retrain.artifacts.formats import Artifact, read_artifact
from retrain.artifacts.metadata import ArtifactMetadata, new_metadata
from retrain.artifacts.publish import keep_for_sweep, publish_version
from retrain.artifacts.sources import load_source, parent_record
from retrain.callbacks.checkpoint import AtomicCheckpointIO, VersionedCheckpoint, saved_epoch
from retrain.callbacks.preemption import Preemption, preemption_checkpoint
from retrain.callbacks.run_report import finish_report
from retrain.callbacks.unfreeze import ProgressiveUnfreeze
from retrain.cv import fold_outputs, refit_record
from retrain.data.balance import loss_weights
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import DataSplits
from retrain.data.summary import log_weights_origin
from retrain.export.qat import finish_qat, start_qat
from retrain.inference.deploy_info import deploy_info
from retrain.model.bn_adapt import adaptation_for, bn_stats_record
from retrain.model.feature_cache import FeatureCache, feature_cache_for
from retrain.model.module import ClassifierModule, best_epoch_row
from retrain.model.pruning import make_permanent, prune_from_config, warn_if_pruning_is_lost
from retrain.model.resnet import build_resnet
from retrain.model.surgery import apply_freeze, load_weights, parse_freeze
from retrain.sweeps import keeps_for_sweep, publishes_itself
from retrain.tasks.common import (
    inherit_hflip,
    make_callbacks,
    make_datamodule,
    make_loggers,
    plain,
    prepare_splits,
    single_device_trainer,
)
from retrain.tasks.guards import (
    check_monitors,
    check_schedule_on_resume,
    check_settings,
    finished_and_published,
    raise_if_trained_nothing,
)
from retrain.tasks.resume import resolve_resume, resume_point
from retrain.tuning import find_lr, lr_set_by_user
from retrain.utils import console
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json
from retrain.utils.ranks import is_rank_zero
from retrain.utils.run_dirs import (
    continue_run,
    continued_run,
    first_logged_step,
    keep_earlier_metrics,
)

log = logging.getLogger("retrain")


def _parent(artifact: Artifact | None, source: str | None, how: str) -> dict[str, Any] | None:
    """Lineage: which file this run was initialised (`init_from`) or resumed from."""
    return None if artifact is None else {**parent_record(str(source), artifact), "how": how}


def _version_for_this_run(cfg: DictConfig) -> registry.Reservation | None:
    if not cfg.save.publish or not is_rank_zero() or not publishes_itself(cfg):  # a sweep publishes its best job
        return None
    if _smoke_test(cfg):
        log.info("trainer.fast_dev_run: a smoke test, so nothing is published to %s", cfg.paths.model_dir)
        return None
    return registry.reserve_version(Path(cfg.paths.model_dir), str(cfg.name))


def _smoke_test(cfg: DictConfig) -> bool:
    """trainer.fast_dev_run (debug=fast): its one-batch model must not become the name's latest published version,
    which predict, serve and eval load by default."""
    return bool(cfg.trainer.get("fast_dev_run"))


def _init_source(model_cfg: DictConfig, model_dir: Path) -> Artifact | None:
    """Read `model.init_from` (weights and metadata); None without one."""
    source = model_cfg.init_from
    if source is None:
        return None
    return load_source(
        str(source),
        model_dir=model_dir,
        allow_pickle=model_cfg.allow_pickle,
        arch=model_cfg.arch,
        check_hash=model_cfg.check_hash,
    )


def _init_weights(net: torch.nn.Module, source: Artifact, name: str) -> None:
    """Load `model.init_from` into the new network (a new head when the class count differs)."""
    head_note = load_weights(net, source.state_dict, source=name)
    if head_note:
        log.info(head_note)


def _module(
    net: torch.nn.Module, cfg: DictConfig, splits: DataSplits, frozen: list[str], metadata: dict[str, Any]
) -> ClassifierModule:
    """The LightningModule with the configured optimizer, scheduler, per-stage learning rates and class weights."""
    class_weights = loss_weights(cfg.model.class_weights, splits.class_counts()["train"])
    if class_weights is not None:
        shown = ", ".join(f"{name} {w:.3g}" for name, w in zip(splits.class_names, class_weights, strict=True))
        log.info("model.class_weights: %s", shown)
    return ClassifierModule(
        net,
        splits.class_names,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        lr=cfg.model.lr,
        weight_decay=cfg.model.weight_decay,
        stage_lr_mult=cfg.model.stage_lr_mult,
        frozen=frozen,
        train_bn=cfg.model.train_bn,
        bn_stats=metadata["bn_stats"]["setting"],
        seed=cfg.seed,
        channels_last=cfg.model.channels_last,
        compile=cfg.model.compile,
        label_smoothing=cfg.model.label_smoothing,
        class_weights=class_weights,
        metadata=metadata,
    )


@dataclass
class DataParts:
    """What the data phase produced: the split, the files it left out, and the DataModule over it."""

    splits: DataSplits
    bad_files: list[str]
    datamodule: ImageFolderDataModule


@dataclass
class ModelParts:
    """What the model phase produced: the network with its weights, what is frozen, and the callbacks it shapes."""

    net: torch.nn.Module
    parent: dict[str, Any] | None  # lineage: the file this run was resumed or initialised from
    frozen: list[str]
    callbacks: list[L.Callback]
    unfreeze: ProgressiveUnfreeze | None
    pruning: dict[str, Any] | None
    qat: DictConfig | None


@dataclass
class Run:
    """Everything fit, test and publish need, built by the phases of `train` in order."""

    cfg: DictConfig
    run_dir: Path
    resume_path: Path | None
    resumed: Artifact | None
    data: DataParts
    model: ModelParts
    reservation: registry.Reservation | None
    module: ClassifierModule
    checkpoints: list[VersionedCheckpoint]
    cache: FeatureCache | None
    cache_blockers: list[str]
    fit_data: L.LightningDataModule
    lr_find: dict[str, Any] | None
    loggers: list[Logger]
    trainer: L.Trainer


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and publish one model; returns what results.json holds."""
    console.filter_known_warnings()
    console.send_library_logs_to_run_log()
    if cfg.extras.print_config:
        console.print_config_tree(cfg)
    check_settings(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir()  # in a sweep, run_task has pointed DDP's re-launched ranks at this job (sweep_job)
    resume_path = resolve_resume(cfg)
    resumed = read_artifact(resume_path, allow_pickle=cfg.model.allow_pickle) if resume_path else None
    if done := finished_and_published(cfg, resumed, resume_path):
        write_json(run_dir / "results.json", done)
        return done
    check_schedule_on_resume(cfg, resumed, resume_path)
    resume_step = None  # going on in a run's folder: the logger step from which this session rewrites its metrics
    if resumed is not None and (continued := continued_run(cfg, resume_path, run_dir)) is not None:
        resume_step = first_logged_step(resumed.checkpoint or {})
        continue_run(cfg, continued, run_dir, resume_step)
        run_dir = continued
    source = _init_source(cfg.model, Path(cfg.paths.model_dir)) if resumed is None else None
    inherit_hflip(cfg.data, resumed or source, HydraConfig.get().overrides.task)  # before the transforms are built
    data = _data_phase(cfg, run_dir, resumed)
    model = _model_phase(cfg, data, resumed, resume_path, source)
    _record_data(run_dir, data)
    reservation = _version_for_this_run(cfg)
    # A run that fails or is stopped (an error, Ctrl-C) drops its reservation; its number is never reused.
    with registry.held(reservation):
        run = _trainer_phase(cfg, run_dir, resume_path, resumed, data, model, reservation, resume_step)
        # SIGTERM from here to publish stops the run at the next step boundary with exit 143 (see Preemption).
        preemption = Preemption(run.trainer, run_dir, str(cfg.name), HydraConfig.get().overrides.task, reservation)
        with preemption:
            _fit_phase(run, preemption)
            if not run.trainer.is_global_zero:
                return {}
            best = _load_best(run)
            test_metrics = _test_phase(run, preemption)
            results = _results(cfg, run.module, run.trainer, best, test_metrics, run_dir, data.bad_files)
            results.update(
                unfreeze=model.unfreeze.summary() if model.unfreeze else None,
                feature_cache=run.cache.summary()
                if run.cache
                else {"enabled": False, "blocked_by": run.cache_blockers},
                lr_find=run.lr_find,
                report=finish_report(model.callbacks, test_metrics),
                prune=model.pruning,
                bn_stats=run.module.metadata.get("bn_stats"),
            )
            if data.splits.cv:  # a fold of a CV sweep writes its out-of-fold predictions (cv.py)
                results["cv"] = fold_outputs(run_dir, data.splits, model.callbacks, run.module, data.datamodule)
            _publish_phase(run, preemption, best, results)
            write_json(run_dir / "results.json", results)
            console.print_summary(results, cfg)
    return results


def _data_phase(cfg: DictConfig, run_dir: Path, resumed: Artifact | None) -> DataParts:
    """Scan and split the images, reusing a resumed run's split."""
    recorded = ((resumed.metadata or {}).get("dataset") if resumed else None) or None
    splits, bad_files = prepare_splits(cfg.data, recorded)
    check_monitors(cfg, splits.class_names)  # the class count decides whether top-5 accuracy is logged
    datamodule = make_datamodule(splits, cfg.data, seed=cfg.seed)
    if cfg.trainer.get("deterministic") and datamodule.persistent_workers:
        # A persistent worker keeps one RNG stream across epochs, so after a resume it would augment differently;
        # workers started per epoch are seeded from that epoch's seed, which makes resume exact.
        log.info("trainer.deterministic: loader workers restart every epoch (persistent_workers=false)")
        datamodule.persistent_workers = False
    if is_rank_zero():
        log_weights_origin(cfg.model.init_from, resumed.path if resumed else None)  # after the data summary
    return DataParts(splits, bad_files, datamodule)


def _record_data(run_dir: Path, data: DataParts) -> None:
    """Write split.json (and the skipped files) once the weights loaded: a refused source leaves no file behind."""
    if is_rank_zero():
        data.splits.save(run_dir / "split.json")
        if data.bad_files:
            (run_dir / "bad_files.txt").write_text("\n".join(data.bad_files) + "\n")


def _model_phase(
    cfg: DictConfig, data: DataParts, resumed: Artifact | None, resume_path: Path | None, source: Artifact | None
) -> ModelParts:
    """Build the network for the data's classes, load its weights, freeze, prune or prepare QAT as configured."""
    net = build_resnet(cfg.model.arch, len(data.splits.class_names))
    if source is not None:
        _init_weights(net, source, str(cfg.model.init_from))
    callbacks = console.without_disabled_progress_bar(make_callbacks(cfg), cfg.trainer.enable_progress_bar)
    unfreeze = next((cb for cb in callbacks if isinstance(cb, ProgressiveUnfreeze)), None)
    frozen = parse_freeze(cfg.model.freeze)
    if unfreeze is not None:  # the schedule's epoch 0 decides what starts frozen
        frozen = unfreeze.initial_frozen(frozen)
    apply_freeze(net, frozen, train_bn=cfg.model.train_bn)
    pruning = prune_from_config(net, cfg.model.prune.amount, cfg.model.prune.method)  # None: no pruning
    qat = cfg.get("qat")  # set by experiment=qat
    if source is not None and pruning is None and is_rank_zero():
        warn_if_pruning_is_lost(source.metadata, str(cfg.model.init_from), qat=qat is not None)
    if qat is not None:
        crop = data.datamodule.preprocessing.crop
        net = start_qat(net, cfg, frozen=frozen, image_size=crop, resuming=resumed is not None)
    if resumed is not None and pruning is None and qat is None:  # those two change the model's keys
        # Lightning's strict load would fail only later, with a raw traceback; this names the keys that differ.
        load_weights(net, resumed.state_dict, source=str(resume_path), replace_head=False)
    parent = _parent(resumed, str(resume_path), "resumed") or _parent(source, cfg.model.init_from, "init_from")
    return ModelParts(net, parent, frozen, callbacks, unfreeze, pruning, qat)


def _metadata_phase(cfg: DictConfig, run_dir: Path, data: DataParts, model: ModelParts, version: int) -> dict[str, Any]:
    """What every checkpoint and published file of this run carries (see artifacts/metadata.py)."""
    dataset_facts = {
        **data.datamodule.describe(),
        "split_file": str(run_dir / "split.json"),
        "bad_files": len(data.bad_files),
    }
    metadata = new_metadata(
        name=str(cfg.name),
        version=version,
        arch=cfg.model.arch,
        class_names=data.splits.class_names,
        preprocessing=data.datamodule.preprocessing,
        augment=data.datamodule.augment,
        config=plain(cfg),
        dataset=dataset_facts,
        parent=model.parent,
        freeze=model.frozen,
        train_bn=cfg.model.train_bn,
    )
    metadata["bn_stats"] = bn_stats_record(cfg.model, model.frozen)  # adapting adds the images it used
    if model.pruning:
        metadata["prune"] = model.pruning
    if model.qat is not None:
        metadata["quantization"] = "qat"
    if cfg.get("cv") and cfg.cv.get("refit_from"):  # a CV refit: the folds' mean and std, and their runs
        metadata["cv"] = refit_record(Path(cfg.cv.refit_from))
    return metadata


def _trainer_phase(
    cfg: DictConfig,
    run_dir: Path,
    resume_path: Path | None,
    resumed: Artifact | None,
    data: DataParts,
    model: ModelParts,
    reservation: registry.Reservation | None,
    resume_step: int | None,
) -> Run:
    """Wrap the network in the LightningModule (stamped with the reserved version), set up the cache and Trainer;
    a run continued in its own folder keeps its metrics.csv up to `resume_step`."""
    callbacks = model.callbacks
    if reservation is not None:  # each epoch tells `registry gc` on other hosts that this run is alive
        callbacks.append(LambdaCallback(on_train_epoch_end=lambda *_: registry.keep_alive(reservation)))
    version = reservation.version if reservation else 0
    metadata = _metadata_phase(cfg, run_dir, data, model, version)
    module = _module(model.net, cfg, data.splits, model.frozen, metadata)
    checkpoints = [cb for cb in callbacks if isinstance(cb, VersionedCheckpoint)]
    for cb in checkpoints:
        cb.stamp(str(cfg.name), version)
    cache, cache_blockers = feature_cache_for(
        cfg.model,
        frozen=model.frozen,
        augment=data.datamodule.augment,
        unfreezes_later=bool(model.unfreeze and model.unfreeze.unfreezes_later()),
        directory=run_dir / "feature_cache",
        mixes_batches=data.datamodule.mixes_batches,
    )
    fit_data: L.LightningDataModule = data.datamodule if cache is None else cache.wrap(data.datamodule)
    if cache is not None:
        callbacks.append(cache)
    if (adaptation := adaptation_for(cfg.model, model.frozen, seed=cfg.seed)) is not None:
        callbacks.append(adaptation)  # on fit start, before the cache extracts a feature
    lr_find = _tune_phase(cfg, module, fit_data, run_dir, resuming=resume_path is not None)
    loggers = make_loggers(cfg)
    if resume_step is not None:
        keep_earlier_metrics(loggers, resume_step)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])
    log_run_facts(loggers, metadata)
    return Run(
        cfg, run_dir, resume_path, resumed, data, model, reservation, module, checkpoints, cache, cache_blockers,
        fit_data, lr_find, loggers, trainer,
    )  # fmt: skip


def _tune_phase(
    cfg: DictConfig, module: ClassifierModule, fit_data: L.LightningDataModule, run_dir: Path, *, resuming: bool
) -> dict[str, Any] | None:
    """The LR range test (`tune.lr_find=true`), before the Trainer exists; None when it is off."""
    if not cfg.tune.lr_find:
        return None
    return find_lr(
        module,
        fit_data,
        tune=cfg.tune,
        trainer_cfg=cfg.trainer,
        run_dir=run_dir,
        user_lr=lr_set_by_user(HydraConfig.get().overrides.task),
        resuming=resuming,
    )


def _fit_phase(run: Run, preemption: Preemption) -> None:
    """Trainer.fit (resuming from `ckpt_path`); on SIGTERM stop with the command that resumes."""
    try:
        run.trainer.fit(run.module, datamodule=run.fit_data, ckpt_path=run.resume_path)
    except SIGTERMException:  # PreemptionCheckpoint saved last.ckpt
        last = preemption_checkpoint(run.model.callbacks) or resume_point(run.checkpoints, run.resume_path)
        preemption.stop("fit", last)
    except SystemExit:
        if not preemption.forced:
            raise
        # A second Ctrl-C stopped fit mid-step and Lightning exited 1: end as interrupted, from the last save.
        preemption.stop("fit", resume_point(run.checkpoints, run.resume_path))
    raise_if_trained_nothing(run.trainer, len(run.data.splits.samples["train"]), run.data.datamodule.batch_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # test and publish run in rank 0 alone


def _load_best(run: Run) -> VersionedCheckpoint | None:
    """Put the best checkpoint's weights into the module (test and publish the best, not the last, weights)."""
    best = next((cb for cb in run.checkpoints if cb.monitor and cb.best_model_path), None)
    if best is not None:
        state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        run.module.load_state_dict(state)
    if run.model.pruning:  # fold the masks in: what is tested and published is a plain ResNet with zeros
        run.model.pruning["sparsity"] = make_permanent(run.module.model)
    return best


def _test_phase(run: Run, preemption: Preemption) -> dict[str, float]:
    """Score the test split once, in one process (`test=false` skips it)."""
    if not run.cfg.test:
        return {}
    last = resume_point(run.checkpoints, run.resume_path)
    tester = single_device_trainer(run.cfg.trainer)  # its own loggers would put the test at epoch 0, step 0
    preemption.stop_if_received("test", last)
    out: list[Any] = []
    try:
        out = tester.test(run.module, datamodule=run.fit_data, verbose=False)
    except SIGTERMException:  # the test loop stops between batches, as fit's do
        preemption.stop("test", last)
    except SystemExit:
        if not preemption.forced:
            raise
        preemption.stop("test", last)  # a second Ctrl-C stopped the test at once (Lightning exited 1)
    metrics = {k: float(v) for k, v in out[0].items()} if out else {}
    _log_at_end_of_fit(run.loggers, run.trainer, metrics)
    return metrics


def _log_at_end_of_fit(loggers: list[Logger], trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Log post-fit metrics at the run's last epoch and step: where fit logged that epoch's metrics."""
    epoch, step = max(trainer.current_epoch - 1, 0), max(trainer.global_step - 1, 0)
    for logger in loggers if metrics else []:
        logger.log_metrics({**metrics, "epoch": epoch}, step=step)
        logger.finalize("success")  # fit finalized them already; this writes the new rows out


def _publish_phase(run: Run, preemption: Preemption, best: VersionedCheckpoint | None, results: dict[str, Any]) -> None:
    """Finish QAT, then publish the tested weights into the reserved registry version."""
    cfg, module = run.cfg, run.module
    if run.model.qat is not None:
        version = run.reservation.version if run.reservation else 0
        source = f"{cfg.name}@{registry.version_dirname(version)}"
        info = deploy_info(ArtifactMetadata.from_dict(module.metadata, source=source), source)
        loader = run.data.datamodule.val_dataloader()
        results["qat"] = finish_qat(module.model, info, run.run_dir / "exports", loader, run.model.qat)
    # From here on a SIGTERM waits for the ~1 s publish.
    preemption.stop_if_received("publish", resume_point(run.checkpoints, run.resume_path))
    best_path = Path(best.best_model_path) if best else None
    if run.reservation is not None:
        results["registry"] = publish_version(
            run.reservation, module.model, module.metadata, best_path, results, full_model=cfg.save.full_model
        )
    elif cfg.save.publish and keeps_for_sweep(cfg) and not _smoke_test(cfg):
        kept = keep_for_sweep(
            run.run_dir, module.model, module.metadata, best_path, results,
            model_dir=Path(cfg.paths.model_dir), name=str(cfg.name), full_model=cfg.save.full_model,
        )  # fmt: skip
        log.info("sweep.publish=best: model kept in %s; the sweep publishes its best job when it ends", kept)


def _results(
    cfg: DictConfig,
    module: ClassifierModule,
    trainer: L.Trainer,
    best: VersionedCheckpoint | None,
    test_metrics: dict[str, float],
    run_dir: Path,
    bad_files: list[str],
) -> dict[str, Any]:
    history = module.history
    monitor = str(cfg.monitor)
    # The epoch of the checkpoint that is tested and published, so the panel and its file name agree.
    epoch = saved_epoch(best.best_model_path) if best else None
    best_row = best_epoch_row(history, monitor, str(cfg.monitor_mode), epoch)
    final = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}  # the last epoch's
    return {
        "status": "ok",
        "name": str(cfg.name),
        "run_dir": str(run_dir),
        "config_path": str(run_dir / ".hydra" / "config.yaml"),
        "monitor": monitor,
        "monitor_mode": str(cfg.monitor_mode),
        "monitor_value": (best_row or {}).get(monitor, final.get(monitor)),
        "best_epoch": best_row["epoch"] if best_row else None,
        "best": best_row,
        "best_checkpoint": best.best_model_path if best else None,
        "last_checkpoint": best.last_model_path if best and best.last_model_path else None,
        "final": final,
        "test": test_metrics,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "class_names": module.class_names,
        "history": history,
        "bad_files": len(bad_files),
        "metadata": {k: module.metadata[k] for k in ("parent", "freeze", "train_bn", "preprocessing")},
    }
