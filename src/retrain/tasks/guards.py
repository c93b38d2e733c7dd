"""Guards of a training run: it starts only if it can work and has something to do, and publishes only what learned.

Settings that cannot work (a batch size of 0, a monitored metric that is never logged) stop the run before a
version is reserved, instead of after the first epoch. Resuming a run that is finished and published does nothing
and says so; resuming with more epochs says what that does to the learning-rate schedule. A fit that ran no
training step publishes nothing. (A loss that is not finite stops the run in `ClassifierModule.training_step`.)
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from retrain.artifacts.formats import Artifact
from retrain.artifacts.registry import version_dirname
from retrain.errors import ArtifactError, ConfigError, TrainingError
from retrain.model.module import epochs_done, logged_metric_names
from retrain.utils.io import read_json

log = logging.getLogger("retrain")


def check_batch_sizes(data_cfg: DictConfig) -> None:
    """data.batch_size (and eval_batch_size when set) must be 1 or more; the loaders would fail late otherwise."""
    for key in ("batch_size", "eval_batch_size"):
        value = data_cfg.get(key)
        if value is not None and int(value) <= 0:
            raise ConfigError(
                f"data.{key}={value}; expected 1 or more images per batch. Fix: e.g. data.{key}=32 (fewer "
                "images than a batch is fine: the run then trains on one smaller batch per epoch)."
            )


def check_settings(cfg: DictConfig) -> None:
    """Refuse settings with which a run cannot train at all, before anything is read or reserved."""
    check_batch_sizes(cfg.data)
    check_monitor_modes(cfg)
    for key, fix in (("max_epochs", "trainer.max_epochs=10"), ("max_steps", "trainer.max_steps=-1 (no limit)")):
        value = cfg.trainer.get(key)
        if value is not None and int(value) == 0:
            raise ConfigError(
                f"trainer.{key}=0 trains nothing, and a model that never trained would be tested and published "
                f"as if it had. Expected 1 or more. Fix: {fix}; to score a model without training, use "
                "python eval.py ckpt_path=SOURCE data.root=DIR."
            )


def _monitored(cfg: DictConfig) -> dict[str, str]:
    """Each monitored metric with the option that names it: `monitor`, or a callback's own `monitor`."""
    found = {str(cfg.monitor): "monitor"}
    for name, conf in (cfg.get("callbacks") or {}).items():
        value = conf.get("monitor") if conf is not None and hasattr(conf, "get") else None
        if value is not None and str(value) not in found:
            found[str(value)] = f"callbacks.{name}.monitor"
    return found


def check_monitor_modes(cfg: DictConfig) -> None:
    """A loss is better when lower: maximizing one would keep the worst epoch, and rank sweeps and Optuna backwards."""
    pairs = [("monitor", str(cfg.get("monitor")), "monitor_mode", str(cfg.get("monitor_mode")))]
    for name, conf in (cfg.get("callbacks") or {}).items():
        if conf is not None and hasattr(conf, "get") and conf.get("monitor") is not None and conf.get("mode"):
            pairs.append((f"callbacks.{name}.monitor", str(conf.monitor), f"callbacks.{name}.mode", str(conf.mode)))
    for option, metric, mode_option, mode in pairs:
        if metric.endswith("loss") and mode == "max":
            raise ConfigError(
                f"{option}={metric} with {mode_option}=max: a loss is better when lower, so checkpointing, early "
                "stopping, the sweep summary and Optuna would keep the epoch and the job with the highest loss. "
                f"Expected {mode_option}=min for a loss. Fix: {mode_option}=min."
            )


def check_monitors(cfg: DictConfig, class_names: list[str]) -> None:
    """Every monitored metric must be one fit logs for this many classes, or checkpointing fails after epoch 1."""
    logged = logged_metric_names(len(class_names))
    for metric, option in _monitored(cfg).items():
        if metric in logged:
            continue
        stage, _, name = metric.partition("/")
        if name == "acc_top5" and stage in ("train", "val"):
            raise ConfigError(
                f"{option}={metric}: top-5 accuracy is logged only with 5 or more classes, and "
                f"{cfg.data.root} has {len(class_names)} ({', '.join(class_names)}). Expected one of {logged}. "
                f"Fix: {option}={stage}/acc."
            )
        close = difflib.get_close_matches(metric, logged, n=1) or ["val/acc"]
        raise ConfigError(
            f"{option}={metric} is never logged, so checkpointing and early stopping could not rank the epochs. "
            f"Expected one of {logged}. Fix: {option}={close[0]}"
            + (" with monitor_mode=min." if close[0].endswith("loss") and cfg.monitor_mode == "max" else ".")
        )


def _published_version(model_dir: Path, metadata: dict[str, Any]) -> Path | None:
    """The registry folder this checkpoint's run published into, or None if it did not (or it was removed)."""
    name, version = metadata.get("name"), metadata.get("version")
    if not name or not version:
        return None
    folder = model_dir / str(name) / version_dirname(int(version))
    try:
        published = read_json(folder / "metadata.json")
    except ArtifactError:  # not published (a stopped run's number), or removed since
        return None
    # Another registry may hold a vNNN of the same name: the run's start time tells them apart.
    return folder if published.get("created") == metadata.get("created") else None


def finished_and_published(cfg: DictConfig, resumed: Artifact | None, resume_path: Path | None) -> dict[str, Any]:
    """What results.json says when `ckpt_path` is a finished fit that was already published (empty: it is not).

    Resuming it would test the same weights again and publish a byte-identical copy; a fit that finished but was
    stopped before publishing (SIGTERM in its test) goes on to test and publish.
    """
    if resumed is None or resume_path is None or not resumed.checkpoint or not resumed.metadata:
        return {}
    epochs, max_epochs = epochs_done(resumed.checkpoint), cfg.trainer.max_epochs
    steps, max_steps = int(resumed.checkpoint.get("global_step", 0)), int(cfg.trainer.get("max_steps") or -1)
    finished = (max_epochs is not None and max_epochs >= 0 and epochs >= max_epochs) or 0 < max_steps <= steps
    folder = _published_version(Path(cfg.paths.model_dir), resumed.metadata) if finished else None
    if folder is None:
        return {}
    ref = f"{resumed.metadata['name']}@{folder.name}"
    log.warning(
        "Nothing to do: %s is a finished run (%d epochs, trainer.max_epochs=%s) already published as %s (%s); "
        "nothing new was published. To train longer, resume with a larger trainer.max_epochs, or start a new "
        "run from it: python train.py model.init_from=%s data.root=DIR",
        resume_path, epochs, max_epochs, ref, folder, ref,
    )  # fmt: skip
    return {
        "status": "nothing_to_do",
        "name": str(resumed.metadata["name"]),
        "checkpoint": str(resume_path),
        "epochs": epochs,
        "registry": {"name": str(resumed.metadata["name"]), "version": folder.name, "path": str(folder)},
    }


def check_schedule_on_resume(cfg: DictConfig, resumed: Artifact | None, resume_path: Path | None) -> None:
    """Say what resuming with more epochs does to the checkpoint's LR schedule, whose length was fixed at its start.

    Cosine keeps its old T_max, so past it the learning rate climbs back to model.lr: warn. One-cycle cannot step
    past its total_steps (PyTorch raises mid-run): refuse now.
    """
    if resumed is None or not resumed.checkpoint or cfg.trainer.max_epochs is None:
        return
    old = ((resumed.metadata or {}).get("config") or {}).get("trainer", {}).get("max_epochs")
    new = int(cfg.trainer.max_epochs)
    if old is None or new <= int(old):
        return
    fresh = f"python train.py model.init_from={resume_path} trainer.max_epochs={new} data.root=DIR"
    for state in resumed.checkpoint.get("lr_schedulers") or []:
        if "T_max" in state:
            log.warning(
                "Resuming with trainer.max_epochs=%d, but the cosine schedule of %s was set for %s epochs "
                "(T_max=%s): after epoch %s the learning rate rises again, up to model.lr by epoch %s, undoing "
                "the annealing. To finish as planned, resume with trainer.max_epochs=%s; to train longer on a "
                "new schedule, start a new run from its weights: %s",
                new, resume_path, old, state["T_max"], state["T_max"], 2 * int(state["T_max"]), old, fresh,
            )  # fmt: skip
        if "total_steps" in state:
            raise ConfigError(
                f"trainer.max_epochs={new}, but the one-cycle schedule of {resume_path} was set for {old} epochs "
                f"({state['total_steps']} steps) and cannot run past them. Expected trainer.max_epochs={old} when "
                f"resuming. Fix: resume with trainer.max_epochs={old}, or start a new run from its weights: {fresh}"
            )


def raise_if_trained_nothing(trainer: L.Trainer, train_images: int, batch_size: int) -> None:
    """A fit that took no optimizer step leaves the initial weights: nothing to test or publish."""
    if trainer.global_step > 0:
        return
    batches = trainer.num_training_batches
    raise TrainingError(
        f"No training step ran: {train_images} training images in batches of {batch_size} gave "
        f"{batches if math.isfinite(batches) else 0} batches per epoch (trainer.limit_train_batches="
        f"{trainer.limit_train_batches}, max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}), so "
        "the weights are the initial ones and nothing was published. Expected at least one step. Fix: give "
        "trainer.limit_train_batches a value above 0, or add training images."
    )
