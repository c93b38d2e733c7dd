"""Train: data -> weights source -> surgery -> Trainer.fit -> test on the best checkpoint -> publish a version."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LambdaCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from retrain.analysis.tracking import log_run_facts
from retrain.artifacts import registry
from retrain.artifacts.formats import Artifact, read_artifact
from retrain.artifacts.metadata import new_metadata
from retrain.artifacts.publish import publish_version
from retrain.artifacts.sources import load_source, parent_record
from retrain.callbacks.checkpoint import AtomicCheckpointIO, VersionedCheckpoint
from retrain.callbacks.preemption import Preemption, preemption_checkpoint
from retrain.callbacks.run_report import finish_report
from retrain.callbacks.unfreeze import ProgressiveUnfreeze
from retrain.errors import ConfigError
from retrain.export.qat import finish_qat, start_qat
from retrain.inference.deploy_info import deploy_info
from retrain.model.feature_cache import feature_cache_for
from retrain.model.module import ClassifierModule
from retrain.model.pruning import make_permanent, prune_from_config
from retrain.model.resnet import build_resnet
from retrain.model.surgery import apply_freeze, load_weights, parse_freeze
from retrain.tasks.common import (
    make_callbacks,
    make_datamodule,
    make_loggers,
    plain,
    prepare_splits,
    single_device_trainer,
)
from retrain.tuning import find_lr, lr_set_by_user
from retrain.utils import console
from retrain.utils.hydra import output_dir
from retrain.utils.io import write_json
from retrain.utils.ranks import is_rank_zero

log = logging.getLogger("retrain")


def resolve_resume(cfg: DictConfig) -> Path | None:
    """Turn `ckpt_path` (a path or `last`) into an existing checkpoint file, or explain what is missing."""
    if cfg.ckpt_path is None:
        return None
    if str(cfg.ckpt_path) == "last":
        runs = Path(cfg.paths.log_dir) / "train" / "runs" / str(cfg.name)
        candidates = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(
                f"ckpt_path=last found no last.ckpt under {runs}/*/checkpoints/. Expected an earlier run named "
                f"{cfg.name!r}. Fix: pass name=<the earlier run's name>, or ckpt_path=/path/to/file.ckpt."
            )
        return candidates[-1]
    path = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not path.is_file():
        nearby = sorted(p.name for p in path.parent.glob("*.ckpt"))[:10] if path.parent.is_dir() else []
        hint = f" .ckpt files in that folder: {nearby}." if nearby else ""
        raise ConfigError(
            f"ckpt_path={path} does not exist.{hint} Expected a Lightning checkpoint of an earlier run. "
            "Fix: pass an existing file, or ckpt_path=last for the newest last.ckpt of this run name."
        )
    return path


def _parent(artifact: Artifact | None, source: str | None, how: str) -> dict[str, Any] | None:
    """Lineage: which file this run was initialised (`init_from`) or resumed from."""
    return None if artifact is None else {**parent_record(str(source), artifact), "how": how}


def _resume_point(checkpoints: list[VersionedCheckpoint], resume_path: Path | None) -> Path | None:
    """What a rerun after a SIGTERM resumes from: the last.ckpt this run wrote, else the file it resumed from.

    A run that resumed a finished fit writes no checkpoint at all, and Lightning does not carry `last_model_path`
    over from another run's folder.
    """
    return next((Path(cb.last_model_path) for cb in checkpoints if cb.last_model_path), resume_path)


def _version_for_this_run(cfg: DictConfig) -> registry.Reservation | None:
    if not cfg.save.publish or not is_rank_zero():
        return None
    return registry.reserve_version(Path(cfg.paths.model_dir), str(cfg.name))


def _init_weights(net: torch.nn.Module, model_cfg: DictConfig, model_dir: Path) -> Artifact | None:
    """Load `model.init_from` into the new network (a new head when the class count differs); None without one."""
    source = model_cfg.init_from
    if source is None:
        return None
    artifact = load_source(
        str(source),
        model_dir=model_dir,
        allow_pickle=model_cfg.allow_pickle,
        arch=model_cfg.arch,
        check_hash=model_cfg.check_hash,
    )
    head_note = load_weights(net, artifact.state_dict, source=str(source))
    if head_note:
        log.info(head_note)
    return artifact


def _module(
    net: torch.nn.Module, cfg: DictConfig, classes: list[str], frozen: list[str], metadata: dict[str, Any]
) -> ClassifierModule:
    """The LightningModule with the configured optimizer, scheduler and per-stage learning rates."""
    return ClassifierModule(
        net,
        classes,
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler) if cfg.model.get("scheduler") else None,
        lr=cfg.model.lr,
        weight_decay=cfg.model.weight_decay,
        stage_lr_mult=cfg.model.stage_lr_mult,
        frozen=frozen,
        train_bn=cfg.model.train_bn,
        seed=cfg.seed,
        channels_last=cfg.model.channels_last,
        compile=cfg.model.compile,
        label_smoothing=cfg.model.label_smoothing,
        metadata=metadata,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test and publish one model; returns what results.json holds."""
    console.filter_known_warnings()
    console.send_library_logs_to_run_log()
    if cfg.extras.print_config:
        console.print_config_tree(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = output_dir()  # in a sweep, run_task has pointed DDP's re-launched ranks at this job (sweep_job)
    resume_path = resolve_resume(cfg)
    resumed = read_artifact(resume_path, allow_pickle=cfg.model.allow_pickle) if resume_path else None
    recorded = ((resumed.metadata or {}).get("dataset") if resumed else None) or None
    splits, bad_files = prepare_splits(cfg.data, recorded)
    datamodule = make_datamodule(splits, cfg.data)
    if cfg.trainer.get("deterministic") and datamodule.persistent_workers:
        # A persistent worker keeps one RNG stream across epochs, so after a resume it would augment differently;
        # workers started per epoch are seeded from that epoch's seed, which makes resume exact.
        log.info("trainer.deterministic: loader workers restart every epoch (persistent_workers=false)")
        datamodule.persistent_workers = False
    classes = splits.class_names

    net = build_resnet(cfg.model.arch, len(classes))
    artifact = _init_weights(net, cfg.model, Path(cfg.paths.model_dir)) if resumed is None else None
    callbacks = console.without_disabled_progress_bar(make_callbacks(cfg), cfg.trainer.enable_progress_bar)
    unfreeze = next((cb for cb in callbacks if isinstance(cb, ProgressiveUnfreeze)), None)
    frozen = parse_freeze(cfg.model.freeze)
    if unfreeze is not None:  # the schedule's epoch 0 decides what starts frozen
        frozen = unfreeze.initial_frozen(frozen)
    apply_freeze(net, frozen, train_bn=cfg.model.train_bn)
    pruning = prune_from_config(net, cfg.model.prune.amount, cfg.model.prune.method)  # None: no pruning
    qat = cfg.get("qat")  # set by experiment=qat
    if qat is not None:
        net = start_qat(
            net, cfg, frozen=frozen, image_size=datamodule.preprocessing["crop"], resuming=resumed is not None
        )
    if resumed is not None and pruning is None and qat is None:  # those two change the model's keys
        # Lightning's strict load would fail only later, with a raw traceback; this names the keys that differ.
        load_weights(net, resumed.state_dict, source=str(resume_path), replace_head=False)

    reservation = _version_for_this_run(cfg)
    version = reservation.version if reservation else 0
    if reservation is not None:  # each epoch tells `registry gc` on other hosts that this run is alive
        callbacks.append(LambdaCallback(on_train_epoch_end=lambda *_: registry.keep_alive(reservation)))
    if is_rank_zero():
        split_file = run_dir / "split.json"
        splits.save(split_file)
        if bad_files:
            (run_dir / "bad_files.txt").write_text("\n".join(bad_files) + "\n")
    dataset_facts = {
        **datamodule.describe(),
        "split_file": str(run_dir / "split.json"),
        "bad_files": len(bad_files),
    }
    metadata = new_metadata(
        name=str(cfg.name),
        version=version,
        arch=cfg.model.arch,
        class_names=classes,
        preprocessing=datamodule.preprocessing,
        augment=datamodule.augment,
        config=plain(cfg),
        dataset=dataset_facts,
        parent=_parent(resumed, str(resume_path), "resumed") or _parent(artifact, cfg.model.init_from, "init_from"),
        freeze=frozen,
        train_bn=cfg.model.train_bn,
    )
    if pruning:
        metadata["prune"] = pruning
    if qat is not None:
        metadata["quantization"] = "qat"
    module = _module(net, cfg, classes, frozen, metadata)
    checkpoints = [cb for cb in callbacks if isinstance(cb, VersionedCheckpoint)]
    for cb in checkpoints:
        cb.stamp(str(cfg.name), version)
    cache, cache_blockers = feature_cache_for(
        cfg.model,
        frozen=frozen,
        augment=datamodule.augment,
        unfreezes_later=bool(unfreeze and unfreeze.unfreezes_later()),
        directory=run_dir / "feature_cache",
        mixes_batches=datamodule.mixes_batches,
    )
    data: L.LightningDataModule = datamodule if cache is None else cache.wrap(datamodule)
    if cache is not None:
        callbacks.append(cache)
    lr_find = None
    if cfg.tune.lr_find:
        lr_find = find_lr(
            module,
            data,
            tune=cfg.tune,
            trainer_cfg=cfg.trainer,
            run_dir=run_dir,
            user_lr=lr_set_by_user(HydraConfig.get().overrides.task),
            resuming=resume_path is not None,
        )
    loggers = make_loggers(cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()])
    log_run_facts(loggers, metadata)
    # SIGTERM from here to publish stops the run at the next step boundary with exit 143 (see Preemption).
    preemption = Preemption(trainer, run_dir, str(cfg.name), HydraConfig.get().overrides.task, reservation)
    with preemption:
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume_path)
        except SIGTERMException:  # PreemptionCheckpoint saved last.ckpt
            preemption.stop("fit", preemption_checkpoint(callbacks) or _resume_point(checkpoints, resume_path))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # test and publish run in rank 0 alone
        if not trainer.is_global_zero:
            return {}
        last = _resume_point(checkpoints, resume_path)

        best = next((cb for cb in checkpoints if cb.monitor and cb.best_model_path), None)
        best_path = Path(best.best_model_path) if best else None
        if best_path:  # test and publish the best weights, not the last ones
            module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
        if pruning:  # fold the masks in: what is tested and published is a plain ResNet with zeros
            pruning["sparsity"] = make_permanent(module.model)
        test_metrics: dict[str, float] = {}
        if cfg.test:
            tester = single_device_trainer(cfg.trainer, loggers)
            preemption.stop_if_received("test", last)
            try:
                out = tester.test(module, datamodule=data, verbose=False)
            except SIGTERMException:  # the test loop stops between batches, as fit's do
                preemption.stop("test", last)
            test_metrics = {k: float(v) for k, v in out[0].items()} if out else {}

        results = _results(cfg, module, trainer, best, test_metrics, run_dir, bad_files)
        results["unfreeze"] = unfreeze.summary() if unfreeze else None
        results["feature_cache"] = cache.summary() if cache else {"enabled": False, "blocked_by": cache_blockers}
        results["lr_find"] = lr_find
        results["report"] = finish_report(callbacks, test_metrics)
        results["prune"] = pruning
        if qat is not None:
            info = deploy_info(module.metadata, f"{cfg.name}@{registry.version_dirname(version)}")
            results["qat"] = finish_qat(module.model, info, run_dir / "exports", datamodule.val_dataloader(), qat)
        preemption.stop_if_received("publish", last)  # from here on a SIGTERM waits for the ~1 s publish
        if reservation is not None:
            results["registry"] = publish_version(
                reservation, module.model, module.metadata, best_path, results, full_model=cfg.save.full_model
            )
        write_json(run_dir / "results.json", results)
        console.print_summary(results, cfg)
    return results


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
    best_row = None
    if history and monitor in history[-1]:
        pick = max if cfg.monitor_mode == "max" else min
        best_row = pick(history, key=lambda row: row.get(monitor, float("nan")))
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1 and not k.startswith("test/")}
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
