"""The thin LightningModule: a torchvision ResNet, its loss and metrics, and the optimizer built per stage."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.seed import seed_everything
from torch import nn
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassStatScores

from retrain.errors import TrainingError
from retrain.model.surgery import param_groups, set_bn_mode
from retrain.utils.ranks import every_rank, own_rank

log = logging.getLogger("retrain")

# Where a checkpoint taken mid-epoch keeps the running state of the epoch's train metrics (`_epoch_metrics`).
EPOCH_STATE_KEY = "retrain_epoch_metrics"

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]  # (optimizer, **extra): one-cycle also takes max_lr and total_steps

# ResNet18 training step, batch 32, one thread, NHWC vs NCHW on a 2-core AMD EPYC with oneDNN: 32 px 0.91x,
# 64 px 1.11x, 96 px 1.21x, 128 px 1.17x, 224 px 1.24x. Below this crop size channels_last stays off on a CPU.
CHANNELS_LAST_MIN_CPU_SIZE = 96


def channels_last_pays(device_type: str, precision: str, image_size: int | None) -> bool:
    """What `model.channels_last=auto` picks: NHWC where its kernels are faster, NCHW elsewhere.

    CPU: from CHANNELS_LAST_MIN_CPU_SIZE up (oneDNN's NHWC convolutions). CUDA: with 16-bit precision, whose tensor
    core kernels want NHWC; in fp32 the gain is small and cuDNN may convert back and forth.
    """
    if device_type == "cuda":
        return precision.startswith(("16", "bf16"))
    return device_type == "cpu" and image_size is not None and image_size >= CHANNELS_LAST_MIN_CPU_SIZE


class BalancedAccuracy(MulticlassStatScores):
    """The mean recall over the classes that have images in the split, as scikit-learn's balanced_accuracy_score.

    torchmetrics' macro accuracy also averages in, as recall 0, a class with no image in the split that the model
    predicted: a k-fold split or test split missing a small class scored lower than the report and the TTA table,
    and `monitor=val/bal_acc` chose by that number.
    """

    higher_is_better = True

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, average="none")

    def compute(self) -> torch.Tensor:
        """Recall per class with images, averaged (0 when the split had no image at all)."""
        tp, _, _, fn = self._final_state()
        support = tp + fn
        present = support > 0
        if not present.any():
            return torch.tensor(0.0)
        return (tp[present].double() / support[present]).mean().float()


def _metrics(num_classes: int) -> MetricCollection:
    metrics: dict[str, Any] = {
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "f1": MulticlassF1Score(num_classes, average="macro"),
        # Balanced accuracy: the mean of the per-class recalls, which a lopsided folder's plain accuracy hides.
        "bal_acc": BalancedAccuracy(num_classes),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def logged_metric_names(num_classes: int) -> list[str]:
    """Every metric fit logs for `num_classes` classes: what `monitor` may name (test/ comes only after fit)."""
    names = ["loss", *_metrics(num_classes).keys()]
    return [f"{stage}/{name}" for stage in ("train", "val") for name in names]


def epoch_row(epoch: int, callback_metrics: Mapping[str, Any], *, validated: bool) -> dict[str, float]:
    """One epoch of history: train metrics as aggregated over the epoch, val metrics only if val ran in it.

    A metric logged on step and epoch appears as `key_step` and `key_epoch`; its plain key may hold the last
    step's value, so the `_epoch` value wins and the row uses the plain name.
    """
    row: dict[str, float] = {"epoch": epoch}
    for key in sorted({k.removesuffix("_epoch").removesuffix("_step") for k in callback_metrics}):
        if key.startswith("train/") or (validated and key.startswith("val/")):
            value = callback_metrics.get(f"{key}_epoch", callback_metrics.get(key))
            if value is not None and value.numel() == 1:
                row[key] = float(value)
    return row


def best_epoch_row(
    history: list[dict[str, float]], monitor: str, mode: str, epoch: int | None
) -> dict[str, float] | None:
    """The history row of the best epoch: the best checkpoint's `epoch` when known (the weights tested and
    published), else the first best `monitor` value; None when no row has `monitor`."""
    rows = [row for row in history if monitor in row]
    chosen = [row for row in rows if row["epoch"] == epoch]
    if chosen or not rows:
        return chosen[0] if chosen else None
    return (max if mode == "max" else min)(rows, key=lambda row: row[monitor])


class ClassifierModule(L.LightningModule):
    """Trains `model` (a torchvision ResNet) with cross-entropy; freezing and BN policy are applied by surgery."""

    def __init__(
        self,
        model: nn.Module,
        class_names: list[str],
        *,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        stage_lr_mult: float | dict[str, float] | None = None,
        frozen: Iterable[str] = (),
        train_bn: bool = False,
        bn_stats: str = "frozen",
        seed: int = 0,
        channels_last: bool | Literal["auto"] = False,
        compile: bool = False,
        label_smoothing: float = 0.0,
        class_weights: list[float] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.class_names = list(class_names)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.lr = lr
        self.weight_decay = weight_decay
        self.stage_lr_mult = stage_lr_mult
        self.frozen = list(frozen)
        self.train_bn = train_bn
        self.bn_stats = bn_stats  # "train": frozen stages' BatchNorm runs in train mode (statistics drift)
        self.seed = seed
        self.channels_last_setting = channels_last
        self.channels_last = channels_last is True  # "auto" is decided in setup(), once the device is known
        self.metadata: dict[str, Any] = metadata or {}
        self.history: list[dict[str, float]] = []  # one row per epoch (`epoch_row`), kept across resume
        self._validated = False  # whether val ran in the current epoch
        self._resume_epoch: int | None = None  # the epoch a checkpoint being restored continues with
        self._seeded_epoch: int | None = None
        # Smoothing regularises training only; val/test loss stay plain cross-entropy, comparable across runs.
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        if class_weights is not None:  # model.class_weights: out of the state_dict, so any checkpoint resumes
            weight = torch.tensor(class_weights, dtype=torch.float32)
            self.train_criterion.register_buffer("weight", weight, persistent=False)
        self.criterion = nn.CrossEntropyLoss()
        n = len(self.class_names)
        self.train_metrics = _metrics(n).clone(prefix="train/")
        # The epoch's mean train loss as a metric object, not a logged tensor: its running state is the module's,
        # so a checkpoint taken mid-epoch carries it (`on_save_checkpoint`) and a resume ends the epoch exactly.
        self.train_loss = MeanMetric(nan_strategy="disable")  # a loss that is not finite stops in training_step
        self._epoch_open = False  # whether train metrics hold a part of the current epoch (a step has run in it)
        self.val_metrics = _metrics(n).clone(prefix="val/")
        self.test_metrics = _metrics(n).clone(prefix="test/")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()  # in place: the state_dict keeps plain torchvision keys (no `_orig_mod.`)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalized images, or of pooled backbone features (the feature cache's batches)."""
        if inputs.ndim == 2:  # (batch, fc.in_features): the backbone ran once, when the cache was built
            return self.model.get_submodule("fc")(inputs)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.model(inputs)

    def setup(self, stage: str) -> None:
        """Decide `channels_last="auto"` from the device, the precision and the crop size, before optimizers exist."""
        if self.channels_last_setting != "auto":
            return
        size = self.metadata.get("preprocessing", {}).get("crop")
        device = self.trainer.strategy.root_device.type
        if channels_last_pays(device, str(self.trainer.precision), size):
            self.channels_last = True
            self.model = self.model.to(memory_format=torch.channels_last)  # in place: parameters keep their identity
        self.channels_last_setting = self.channels_last  # decided once: the post-fit test keeps the same layout
        log.info("model.channels_last=auto: %s (%s, %s px)", "on" if self.channels_last else "off", device, size)

    def train(self, mode: bool = True) -> ClassifierModule:
        """Enter train mode but keep BatchNorm of frozen stages in eval mode (unless `train_bn` or bn_stats=train)."""
        super().train(mode)
        if mode:
            set_bn_mode(self.model, self.frozen, self.train_bn or self.bn_stats == "train")
        return self

    def on_fit_start(self) -> None:
        """Seed this fit's first epoch and apply the BN policy now, before Lightning creates the epoch's data iterator
        (and before sanity checking captures module modes); a run resumed mid-epoch gets no on_train_epoch_start."""
        epoch, self._resume_epoch = self._resume_epoch or 0, None
        self._seed_epoch(epoch)
        self.train()

    def on_train_epoch_start(self) -> None:
        """Seed the RNGs from (seed, epoch) so shuffling and augmentation replay exactly after a resume.

        Also re-apply the BN policy: Lightning restores per-module modes captured before sanity checking (all
        train), so the frozen stages' BatchNorm must be put back in eval mode at every epoch start.
        """
        if self.current_epoch != self._seeded_epoch:
            self._seed_epoch(self.current_epoch)
        self.train()

    def _seed_epoch(self, epoch: int) -> None:
        # Every epoch's iterator then starts from the same RNG state, whether the epoch follows another
        # one in this process or is the first after a resume.
        seed_everything(self.seed + epoch, workers=True, verbose=False)
        self._seeded_epoch = epoch

    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        loss = (self.train_criterion if stage == "train" else self.criterion)(logits, labels)
        if labels.ndim == 2:  # MixUp/CutMix class probabilities: score against the dominant class
            labels = labels.argmax(dim=1)
        metrics.update(logits, labels)
        if stage == "train":
            self.train_loss(loss.detach(), len(labels))  # the batch's loss for the step, weighted into the epoch's
            self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels))
        else:
            self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(labels))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=len(labels))
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on one batch; a loss that is not finite stops the run before it reaches the weights."""
        loss, _ = self._step(batch, self.train_metrics, "train")
        self._epoch_open = True
        if not torch.isfinite(loss):
            raise TrainingError(self._diverged(float(loss.detach()), batch_idx))
        return loss

    def _diverged(self, loss: float, batch_idx: int) -> str:
        groups = self.trainer.optimizers[0].param_groups if self.trainer.optimizers else []
        lr = max((float(group["lr"]) for group in groups), default=self.lr)
        return (
            f"train/loss is {loss} at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) with "
            f"learning rate {lr:g}: training diverged, so this run publishes nothing; checkpoints saved before "
            "this step are intact. Expected a finite loss. Fix: lower the learning rate (e.g. "
            f"model.lr={self.lr / 100:g}) or let tune.lr_find=true pick it; trainer.gradient_clip_val=1.0 bounds "
            "each update; with precision=16-mixed, try bf16-mixed or 32-true."
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Accumulate val loss and metrics; the logits go to callbacks (the report keeps the last epoch's)."""
        return self._step(batch, self.val_metrics, "val")[1].detach()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """Accumulate test loss and metrics."""
        self._step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Class probabilities for a batch (labels, if present, are ignored)."""
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).softmax(dim=1)

    def on_validation_epoch_end(self) -> None:
        """Note that this epoch has fresh val metrics (the sanity check's do not count)."""
        self._validated = not self.trainer.sanity_checking

    def on_train_epoch_end(self) -> None:
        """Remember this epoch's metrics for results.json, once its train aggregates and val metrics are final.

        Runs after validation and before the checkpoint callbacks save, so every checkpoint carries this row.
        """
        self.history.append(epoch_row(self.current_epoch, self.trainer.callback_metrics, validated=self._validated))
        self._validated = False
        self._epoch_open = False

    def configure_optimizers(self) -> Any:
        """One parameter group per stage, fixed now, so resume and unfreezing never change the layout."""
        if self.optimizer_factory is None:
            raise RuntimeError("ClassifierModule was built for inference: pass optimizer= to train it")
        groups = param_groups(self.model, lr=self.lr, weight_decay=self.weight_decay, stage_lr_mult=self.stage_lr_mult)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        if getattr(self.scheduler_factory, "func", None) is torch.optim.lr_scheduler.OneCycleLR:
            # One-cycle steps every batch and peaks at each stage's own learning rate.
            total = int(self.trainer.estimated_stepping_batches)
            peaks = [group["lr"] for group in optimizer.param_groups]
            one_cycle = self.scheduler_factory(optimizer, max_lr=peaks, total_steps=total)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": one_cycle, "interval": "step"}}
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Embed the artifact metadata (with this moment's epoch, step and metrics) in every checkpoint."""
        meta = copy.deepcopy(self.metadata)
        meta["epoch"] = self.current_epoch
        meta["global_step"] = self.global_step
        meta["metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        meta["history"] = self.history
        checkpoint["retrain"] = meta
        if self._epoch_open:  # taken mid-epoch: the train metrics' running state, so the resumed epoch ends the same
            running = {
                name: {key: torch.as_tensor(value).detach().cpu().clone() for key, value in metric.metric_state.items()}
                for name, metric in self._epoch_metrics().items()
            }  # every state of these metrics is one tensor (no list states)
            checkpoint[EPOCH_STATE_KEY] = every_rank(running)  # each rank's own sums (DDP)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the metric history (and a mid-epoch checkpoint's running train metrics) on resume, and note
        which epoch the run continues with."""
        self.history = list(checkpoint.get("retrain", {}).get("history", []))
        self._resume_epoch = epochs_done(checkpoint)
        self.train_loss.reset()  # nothing left over from before the restore (the LR finder's steps)
        self.train_metrics.reset()  # (the collection's reset keeps its compute groups linked)
        if EPOCH_STATE_KEY not in checkpoint:
            self._epoch_open = False
            return
        running, mismatch = own_rank(checkpoint[EPOCH_STATE_KEY])
        if mismatch is not None:
            log.warning("The epoch's train metrics so far were %s: they count from the resume on.", mismatch)
            running = {}
        metrics = self._epoch_metrics()  # a fresh module's collection links its groups after its first update
        for name, state in running.items():
            for key, value in state.items():
                setattr(metrics[name], key, value.to(metrics[name].device))
        self._epoch_open = True

    def _epoch_metrics(self) -> dict[str, Metric]:
        """The metrics that accumulate over a training epoch, by logged name."""
        return {"train/loss": self.train_loss, **dict(self.train_metrics.items(keep_base=False, copy_state=False))}


def epochs_done(checkpoint: dict[str, Any]) -> int:
    """The epochs a checkpoint's fit has finished: the fit loop's processed epochs, where a resume continues."""
    try:
        return int(checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):  # a checkpoint without loop state restarts the epoch count
        return 0
