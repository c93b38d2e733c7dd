"""Train: data -> weights source -> surgery -> Trainer.fit -> test on the best checkpoint -> publish a version."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from retrain.artifacts import registry
from retrain.artifacts.formats import (
    Artifact,
    read_artifact,
    save_full_model,
    save_safetensors,
    save_weights_pth,
)
from retrain.artifacts.metadata import new_metadata, sha256_file, write_json
from retrain.artifacts.sources import load_source, parent_record
from retrain.callbacks.checkpoint import AtomicCheckpointIO, VersionedCheckpoint
from retrain.callbacks.preemption import exit_preempted
from retrain.callbacks.report import finish_report
from retrain.callbacks.unfreeze import ProgressiveUnfreeze
from retrain.data.demo import build_demo_dataset
from retrain.data.images import IMAGE_PROBLEM_KINDS
from retrain.data.validate import ERROR_KINDS, ValidationReport, raise_for_bad_files, scan
from retrain.errors import ConfigError, DataError
from retrain.export.metadata import deploy_info
from retrain.export.prune import make_permanent, prune_from_config
from retrain.export.qat import finish_qat, start_qat
from retrain.model.feature_cache import feature_cache_for
from retrain.model.module import ClassifierModule
from retrain.model.resnet import build_resnet
from retrain.model.surgery import apply_freeze, load_weights, parse_freeze
from retrain.reporting.tracking import log_run_facts
from retrain.tasks.common import (
    find_splits,
    make_callbacks,
    make_datamodule,
    make_loggers,
    plain,
    single_device_trainer,
)
from retrain.tuning import find_lr, lr_set_by_user
from retrain.utils import console
from retrain.utils.hydra import output_dir
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


def _prepare_data(cfg: DictConfig, resumed: Artifact | None) -> Any:
    if cfg.data.demo and is_rank_zero():
        build_demo_dataset(Path(cfg.data.root))
    recorded = ((resumed.metadata or {}).get("dataset") if resumed else None) or None
    splits = find_splits(cfg.data, recorded)
    bad: list[str] = []
    if cfg.data.validate != "off":
        report = scan(Path(cfg.data.root), mode=cfg.data.validate)
        _raise_for_structure(report)
        bad = [str(p) for p in report.bad_files()]
        if bad and cfg.data.on_bad_file == "error":
            raise_for_bad_files(report)
        if bad:
            log.warning("skipping %d bad files (data.on_bad_file=skip); listed in bad_files.txt", len(bad))
            splits = splits.without({os.path.abspath(p) for p in bad})
    return splits, bad


def _raise_for_structure(report: ValidationReport) -> None:
    """Stop on a missing or empty class or split under either policy: skipping files cannot fix those."""
    problems = [p for p in report.problems if p.kind in ERROR_KINDS and p.kind not in IMAGE_PROBLEM_KINDS]
    if problems:
        listed = "; ".join(f"{p.path}: {p.detail}" for p in problems[:10])
        raise DataError(
            f"{report.root} has {len(problems)} class or split problems that data.on_bad_file cannot skip: "
            f"{listed}. Expected the same non-empty class folders in every split. Fix: add images to the empty "
            f"classes or remove them from every split; `python -m retrain.data.validate {report.root}` lists all."
        )


def _version_for_this_run(cfg: DictConfig) -> registry.Reservation | None:
    if not cfg.save.publish or not is_rank_zero():
        return None
    return registry.reserve_version(Path(cfg.paths.model_dir), str(cfg.name))


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
    splits, bad_files = _prepare_data(cfg, resumed)
    datamodule = make_datamodule(splits, cfg.data)
    if cfg.trainer.get("deterministic") and datamodule.persistent_workers:
        # A persistent worker keeps one RNG stream across epochs, so after a resume it would augment differently;
        # workers started per epoch are seeded from that epoch's seed, which makes resume exact.
        log.info("trainer.deterministic: loader workers restart every epoch (persistent_workers=false)")
        datamodule.persistent_workers = False
    classes = splits.class_names

    net = build_resnet(cfg.model.arch, len(classes))
    source = cfg.model.init_from
    artifact = None
    if source is not None and resumed is None:
        artifact = load_source(
            str(source),
            model_dir=Path(cfg.paths.model_dir),
            allow_pickle=cfg.model.allow_pickle,
            arch=cfg.model.arch,
            check_hash=cfg.model.check_hash,
        )
        head_note = load_weights(net, artifact.state_dict, source=str(source))
        if head_note:
            log.info(head_note)
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
        parent=_parent(resumed, str(resume_path), "resumed") or _parent(artifact, source, "init_from"),
        freeze=frozen,
        train_bn=cfg.model.train_bn,
    )
    if pruning:
        metadata["prune"] = pruning
    if qat is not None:
        metadata["quantization"] = "qat"
    module = ClassifierModule(
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
        metadata=metadata,
    )
    checkpoints = [cb for cb in callbacks if isinstance(cb, VersionedCheckpoint)]
    for cb in checkpoints:
        cb.stamp(str(cfg.name), version)
    cache, cache_blockers = feature_cache_for(
        cfg.model,
        frozen=frozen,
        augment=datamodule.augment,
        unfreezes_later=bool(unfreeze and unfreeze.unfreezes_later()),
        directory=run_dir / "feature_cache",
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
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume_path)
    except SIGTERMException:  # preempted: PreemptionCheckpoint saved last.ckpt; publish nothing
        exit_preempted(trainer, callbacks, run_dir, str(cfg.name))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # test and publish run in rank 0 alone
    if not trainer.is_global_zero:
        return {}

    best = next((cb for cb in checkpoints if cb.monitor and cb.best_model_path), None)
    best_path = Path(best.best_model_path) if best else None
    if best_path:  # test and publish the best weights, not the last ones
        module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
    if pruning:  # fold the masks in: what is tested and published is a plain ResNet with zeros
        pruning["sparsity"] = make_permanent(module.model)
    test_metrics: dict[str, float] = {}
    if cfg.test:
        out = single_device_trainer(cfg.trainer, loggers).test(module, datamodule=data, verbose=False)
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
    if reservation is not None:
        results["registry"] = _publish(cfg, reservation, module, best_path, results)
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


def _publish(
    cfg: DictConfig,
    reservation: registry.Reservation,
    module: ClassifierModule,
    best_path: Path | None,
    results: dict[str, Any],
) -> dict[str, Any]:
    """Write every format into the reserved staging folder, then move it into place as the new version."""
    staging = reservation.staging
    try:
        meta = dict(module.metadata)
        if best_path:
            shutil.copy2(best_path, staging / "model.ckpt")
            meta = read_artifact(best_path).metadata or meta
            meta["checkpoint_sha256"] = sha256_file(staging / "model.ckpt")
        meta["metrics"] = {**meta.get("metrics", {}), **results["test"]}
        meta["results"] = {k: results[k] for k in ("monitor", "monitor_value", "best_epoch", "test")}
        state = {k: v.detach().cpu() for k, v in module.model.state_dict().items()}
        save_weights_pth(state, staging / "weights.pth")
        save_safetensors(state, meta, staging / "model.safetensors")
        if cfg.save.full_model:
            save_full_model(module.model, staging / "model_full.pt")
        write_json(staging / "metadata.json", meta)
        write_json(staging / "results.json", results)
        if results.get("report"):
            shutil.copytree(results["report"], staging / "report")
        if results.get("qat"):
            shutil.copytree(results["qat"]["out_dir"], staging / "exports")
        final = registry.publish(reservation)
    except BaseException:
        registry.abandon(reservation)
        raise
    return {"name": reservation.name, "version": reservation.version, "path": str(final)}
