"""The end-of-run report as a callback: curves, confusion matrix, per-class numbers and top losses in `report/`."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import ModelCheckpoint

from retrain.analysis.report_files import (
    REPORT_FILES,
    Predictions,
    ReportInputs,
    predict_samples,
    write_markdown,
    write_report,
)
from retrain.analysis.tracking import log_report
from retrain.callbacks.checkpoint import saved_epoch
from retrain.model.module import ClassifierModule, best_epoch_row, epoch_row
from retrain.model.resnet import STAGES, stage_of

log = logging.getLogger("retrain")


def trainable_stages(net: torch.nn.Module) -> list[str]:
    """The ResNet stages with at least one trainable parameter, in network order."""
    found = {stage_of(name) for name, param in net.named_parameters() if param.requires_grad}
    return [stage for stage in STAGES if stage in found]


def task_overrides() -> list[str]:
    """The command-line overrides of this Hydra job (none outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


class RunReport(L.Callback):
    """Write the run's report into `dirpath` when fit ends, with the val split's predictions of the best checkpoint.

    Those predictions are the ones validation made in that checkpoint's epoch, kept as it ran, so the images are
    not scored again; only when they are not at hand (a resumed run's earlier best, a DDP shard, limited val
    batches) does it score the split itself.

    It keeps its own per-epoch history (train metrics as aggregated over the epoch, val metrics of that epoch)
    and notes every epoch at which more stages became trainable (an unfreeze milestone); both survive a
    resume through ``state_dict``.

    >>> report = RunReport("/tmp/run/report", top_k=8)
    >>> report.state_dict()
    {'history': [], 'milestones': [], 'trainable': None}
    """

    def __init__(self, dirpath: str | Path, *, top_k: int = 16, split: str = "val", batch_size: int = 64) -> None:
        self.dirpath = Path(dirpath)
        self.top_k = top_k
        self.split = split
        self.batch_size = batch_size
        self.history: list[dict[str, Any]] = []
        self.milestones: list[dict[str, Any]] = []
        self._trainable: list[str] | None = None
        self._validated = False
        self._val_batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # this val epoch's (probs, labels)
        self._kept: dict[str, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}  # "last", "best": (epoch, ...)
        self._loggers: list[Any] = []
        self.inputs: ReportInputs | None = None  # set once the report is written

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note the stages trainable at the start (after a resume: as they were when the run stopped)."""
        if self._trainable is None:
            self._trainable = trainable_stages(pl_module.get_submodule("model"))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start collecting this val epoch's predictions."""
        self._val_batches = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Keep the batch's class probabilities (the module's validation_step returns its logits)."""
        if not trainer.sanity_checking and isinstance(outputs, torch.Tensor):
            self._val_batches.append((outputs.float().softmax(dim=1).cpu(), batch[1].cpu()))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remember that this epoch has fresh val metrics and predictions (not the sanity check's)."""
        self._validated = not trainer.sanity_checking
        if self._validated:
            self._kept["last"] = (trainer.current_epoch, self._val_batches)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record this epoch's metrics and whether stages were unfrozen during it."""
        # The same row as the module's history (results.json), so the report and the results agree.
        self.history.append(epoch_row(trainer.current_epoch, trainer.callback_metrics, validated=self._validated))
        self._keep_if_best(trainer.checkpoint_callback)
        self._validated = False
        now = trainable_stages(pl_module.get_submodule("model"))
        added = [stage for stage in now if stage not in (self._trainable or [])]
        if added:
            self.milestones.append({"epoch": trainer.current_epoch, "stages": added})
        self._trainable = now

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Score the split with the best weights and write the report (rank 0 only)."""
        if not trainer.is_global_zero:
            return
        if getattr(trainer, "fast_dev_run", False):  # a smoke test: like checkpoints and loggers, the report is skipped
            log.info("fast_dev_run: no report written")
            return
        module = cast(ClassifierModule, pl_module)
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        net, weights = self._best_weights(trainer, module)
        checkpoint = trainer.checkpoint_callback
        best_epoch = self._best_epoch(checkpoint)
        samples = datamodule.splits.samples[self.split]
        from_best = isinstance(checkpoint, ModelCheckpoint) and bool(checkpoint.best_model_path)
        scored = best_epoch if from_best else trainer.current_epoch - 1  # the epoch whose weights are reported
        predictions = self._kept_predictions(scored, samples) or predict_samples(
            net, samples, datamodule.preprocessing, device=trainer.strategy.root_device, batch_size=self.batch_size
        )
        meta = module.metadata
        run_dir = Path(trainer.default_root_dir)
        bad_list = run_dir / "bad_files.txt"
        self.inputs = ReportInputs(
            title=f"Report: {meta.get('name', 'model')} v{int(meta.get('version') or 0):03d}",
            class_names=list(module.class_names),
            history=self.history,
            milestones=self.milestones,
            predictions=predictions,
            split=self.split,
            weights=weights,
            monitor=checkpoint.monitor if isinstance(checkpoint, ModelCheckpoint) else None,
            best_epoch=best_epoch,
            overrides=task_overrides(),
            dataset=meta.get("dataset") or datamodule.describe(),
            bad_files=bad_list.read_text().split() if bad_list.is_file() else [],
        )
        write_report(self.inputs, self.dirpath, top_k=self.top_k)
        self._loggers = list(trainer.loggers)
        log_report(self._loggers, self.dirpath, REPORT_FILES)
        log.info("report written to %s", self.dirpath / "report.md")

    def add_metrics(self, metrics: dict[str, float]) -> None:
        """Put metrics known only after fit (the test scores) into report.md and the loggers' copy of it."""
        if self.inputs is None:
            return
        self.inputs.metrics.update(metrics)
        write_markdown(self.inputs, self.dirpath)
        log_report(self._loggers, self.dirpath, ("report.md",))

    def _best_weights(self, trainer: L.Trainer, module: ClassifierModule) -> tuple[torch.nn.Module, str]:
        # A copy, so the module the Trainer holds keeps its weights (train.py loads the best ones itself).
        net = copy.deepcopy(module.model)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
            net.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
            epoch = self._best_epoch(checkpoint)
            return net, f"the best checkpoint (epoch {epoch})" if epoch is not None else "the best checkpoint"
        return net, "the final weights"

    def _keep_if_best(self, checkpoint: Any) -> None:
        """Keep this epoch's val predictions while it is the best so far (ModelCheckpoint's rule: strictly better)."""
        monitor = getattr(checkpoint, "monitor", None)
        value = self.history[-1].get(monitor or "") if self._validated else None
        if value is None or "last" not in self._kept:
            return
        best = self._kept.get("best")
        best_value = self._history_value(best[0], monitor or "") if best else None
        better = best_value is None or (value > best_value if checkpoint.mode == "max" else value < best_value)
        if better:
            self._kept["best"] = self._kept["last"]

    def _history_value(self, epoch: int, key: str) -> float | None:
        """`key` as recorded for `epoch`, or None."""
        return next((row[key] for row in self.history if row.get("epoch") == epoch and key in row), None)

    def _kept_predictions(self, epoch: int | None, samples: list[tuple[str, int]]) -> Predictions | None:
        """The predictions validation made with the weights of `epoch`, if kept whole and in the split's order."""
        kept = next((batches for e, batches in self._kept.values() if e == epoch), None)
        if not kept:
            return None
        probs, labels = torch.cat([p for p, _ in kept]), torch.cat([y for _, y in kept])
        if labels.tolist() != [label for _, label in samples]:  # a DDP shard, limited batches: score it all
            return None
        log.info("report: reusing the val predictions of epoch %d (the images are not scored again)", epoch)
        return Predictions(probs.numpy(), labels.numpy(), [path for path, _ in samples])

    def _best_epoch(self, checkpoint: Any) -> int | None:
        if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.best_model_path:
            return None
        epoch = saved_epoch(checkpoint.best_model_path)
        row = best_epoch_row(self.history, checkpoint.monitor or "", checkpoint.mode, epoch)
        return int(row["epoch"]) if row else None

    def state_dict(self) -> dict[str, Any]:
        """History and milestones, so a resumed run's curves start at epoch 0."""
        return {"history": self.history, "milestones": self.milestones, "trainable": self._trainable}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history of the run being resumed."""
        self.history = list(state_dict.get("history", []))
        self.milestones = list(state_dict.get("milestones", []))
        self._trainable = state_dict.get("trainable")


def finish_report(callbacks: list[L.Callback], metrics: dict[str, float]) -> str | None:
    """Add post-fit metrics to the run's report; returns its folder (for results.json), or None without one."""
    for callback in callbacks:
        if isinstance(callback, RunReport) and callback.inputs is not None:
            callback.add_metrics(metrics)
            return str(callback.dirpath)
    return None
