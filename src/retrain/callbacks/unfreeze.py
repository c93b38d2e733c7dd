"""Progressive unfreezing on an epoch schedule, with a fixed optimizer layout, exact resume and DDP support."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from retrain.errors import ConfigError
from retrain.model.feature_cache import weights_digest
from retrain.model.module import ClassifierModule
from retrain.model.resnet import STAGES
from retrain.model.surgery import apply_freeze

log = logging.getLogger("retrain")

_HOWTO = (
    "Write e.g. `callbacks.unfreeze.schedule=[0:fc,2:layer4,4:layer3+layer2,6:all]` (EPOCH:STAGES, stages "
    "joined with +, `all` for every stage) or `callbacks.unfreeze.freeze_epochs=1` (fc alone, then all)."
)


def _stages(value: object, epoch: int) -> list[str]:
    """Stage names of one schedule entry, in STAGES order; `all` means every stage."""
    if isinstance(value, str):
        names = [part.strip() for part in value.replace("+", ",").split(",") if part.strip()]
    elif isinstance(value, Iterable):
        names = [str(part).strip() for part in value]
    else:
        names = []
    if "all" in names:
        return list(STAGES)
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ConfigError(
            f"callbacks.unfreeze.schedule: epoch {epoch} names {value!r}; expected stage names from "
            f"{', '.join(STAGES)} or `all`. {_HOWTO}"
        )
    return [stage for stage in STAGES if stage in names]


def _epoch(value: object) -> int:
    try:
        epoch = int(str(value).strip())
    except ValueError:
        epoch = -1
    if epoch < 0:
        raise ConfigError(f"callbacks.unfreeze.schedule: {value!r} is not an epoch; expected an integer >= 0. {_HOWTO}")
    return epoch


def parse_schedule(schedule: object = None, freeze_epochs: int | None = None) -> dict[int, list[str]]:
    """Turn the schedule config (a mapping, or `EPOCH:STAGES` strings that a command line can override) into
    {epoch: stages that become trainable then}; `freeze_epochs=N` is short for `[0:fc, N:all]` (fastai)."""
    if schedule is None:
        if freeze_epochs is None or isinstance(freeze_epochs, bool) or int(freeze_epochs) < 1:
            raise ConfigError(
                f"callbacks.unfreeze: schedule is null and freeze_epochs={freeze_epochs!r}; expected a schedule "
                f"or freeze_epochs >= 1. {_HOWTO}"
            )
        return {0: ["fc"], int(freeze_epochs): list(STAGES)}
    if isinstance(schedule, Mapping):
        pairs = [(_epoch(key), value) for key, value in schedule.items()]
    elif isinstance(schedule, Iterable) and not isinstance(schedule, str):
        pairs = []
        for item in schedule:
            epoch, sep, stages = str(item).partition(":")
            if not sep:
                raise ConfigError(f"callbacks.unfreeze.schedule: {item!r} has no `:`. {_HOWTO}")
            pairs.append((_epoch(epoch), stages))
    else:
        raise ConfigError(f"callbacks.unfreeze.schedule: got {schedule!r}; expected a list or a mapping. {_HOWTO}")
    epochs = [epoch for epoch, _ in pairs]
    if len(set(epochs)) != len(epochs):
        raise ConfigError(f"callbacks.unfreeze.schedule: an epoch appears twice in {schedule!r}. {_HOWTO}")
    if 0 not in epochs:
        raise ConfigError(
            f"callbacks.unfreeze.schedule: {schedule!r} does not say what trains at epoch 0; expected an entry "
            f"such as `0:fc`. {_HOWTO}"
        )
    return {epoch: _stages(value, epoch) for epoch, value in sorted(pairs)}


class ProgressiveUnfreeze(Callback):
    """Make ResNet stages trainable on an epoch schedule without ever changing the optimizer's parameter groups.

    Each entry lists the stages that train from that epoch on (cumulative). Unfreezing flips `requires_grad` and,
    through `pl_module.frozen`, the BatchNorm mode of the stage; the six per-stage optimizer groups exist from the
    start, so the LR scheduler covers all of them and a checkpoint's optimizer state always fits. The trainable set
    is part of the callback's checkpoint state, so a resumed run continues with exactly the same one. Under DDP,
    stages that were frozen when DDP wrapped the model are outside its reducer; their gradients are averaged here.

    >>> cb = ProgressiveUnfreeze(["0:fc", "2:layer4", "4:layer3+layer2", "6:all"])
    >>> cb.frozen_at(0)
    ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    >>> cb.frozen_at(5)
    ['stem', 'layer1']
    >>> ProgressiveUnfreeze(freeze_epochs=1).schedule
    {0: ['fc'], 1: ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']}
    """

    def __init__(self, schedule: object = None, freeze_epochs: int | None = None) -> None:
        self.schedule = parse_schedule(schedule, freeze_epochs)
        self.trainable: set[str] = set()  # grows only; restored on resume
        self.history: list[dict[str, Any]] = []  # one row per epoch: trainable stages and each group's LR
        self.replica_checksums: list[str] = []
        self._outside_reducer: list[torch.nn.Parameter] = []  # filled under DDP only

    def trainable_at(self, epoch: int) -> list[str]:
        """Stages the schedule makes trainable by `epoch`, in STAGES order."""
        names = {stage for start, stages in self.schedule.items() if start <= epoch for stage in stages}
        return [stage for stage in STAGES if stage in names]

    def frozen_at(self, epoch: int) -> list[str]:
        """Stages still frozen during `epoch`."""
        trainable = self.trainable_at(epoch)
        return [stage for stage in STAGES if stage not in trainable]

    def unfreezes_later(self) -> bool:
        """Whether any stage becomes trainable after epoch 0 (then the backbone's features change mid-run)."""
        first = self.schedule[0]
        return any(stage not in first for epoch, stages in self.schedule.items() if epoch for stage in stages)

    def initial_frozen(self, configured: list[str]) -> list[str]:
        """The freeze to build the model with: the schedule's epoch 0, which `model.freeze` may only repeat."""
        start = self.frozen_at(0)
        if configured and configured != start:
            raise ConfigError(
                f"model.freeze={configured} and callbacks.unfreeze.schedule both decide what is frozen at epoch 0; "
                f"the schedule freezes {start}. Fix: drop model.freeze (the schedule decides), or make the "
                f"schedule's `0:` entry train what model.freeze leaves trainable."
            )
        return start

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Freeze epoch 0's stages before DDP wraps the model, so its reducer holds exactly the trainable ones."""
        if stage == "fit" and not self.trainable:
            self._apply(pl_module, self.frozen_at(0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note what DDP's reducer leaves out (stages frozen when it wrapped the model), then apply a resumed run's
        trainable set now: a run resumed mid-epoch gets no on_train_epoch_start for that epoch."""
        wrapped = isinstance(trainer.strategy.model, DistributedDataParallel)
        self._outside_reducer = [p for p in pl_module.parameters() if wrapped and not p.requires_grad]
        if self.trainable:
            self._apply(pl_module, [stage for stage in STAGES if stage not in self.trainable])

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Unfreeze what the schedule says for this epoch, then log the trainable stages (the LR monitor logs LRs)."""
        epoch = trainer.current_epoch
        before = set(self.trainable)
        self.trainable |= set(self.trainable_at(epoch))
        frozen = [stage for stage in STAGES if stage not in self.trainable]
        self._apply(pl_module, frozen)
        if before and self.trainable != before:
            log.info("epoch %d: unfroze %s", epoch, ", ".join(s for s in STAGES if s in self.trainable - before))
        lrs = {group.get("name", str(i)): group["lr"] for i, group in enumerate(trainer.optimizers[0].param_groups)}
        self.history = [row for row in self.history if row["epoch"] < epoch]
        self.history.append({"epoch": epoch, "trainable": [s for s in STAGES if s in self.trainable], "lr": lrs})
        flags = {f"trainable/{stage}": float(stage in self.trainable) for stage in STAGES}
        pl_module.log_dict(flags, on_step=False, on_epoch=True, sync_dist=True)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Average, across ranks, the gradients DDP does not: those of stages unfrozen after it wrapped the model."""
        if not self._outside_reducer:
            return
        grads = [p.grad for p in self._outside_reducer if p.requires_grad and p.grad is not None]
        if not grads:
            return
        # One collective for all of them; every rank runs the same graph, so every rank sends the same shapes.
        flat = trainer.strategy.reduce(torch.cat([g.reshape(-1) for g in grads]), reduce_op="mean")
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Record every rank's weights checksum: under DDP they must agree, or the replicas have diverged."""
        digest = weights_digest(pl_module)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, digest)
            self.replica_checksums = [str(d) for d in gathered]
        else:
            self.replica_checksums = [digest]
        if len(set(self.replica_checksums)) > 1:
            log.error("DDP replicas hold different weights at the end of training: %s", self.replica_checksums)

    def summary(self) -> dict[str, Any]:
        """What results.json records: the schedule, what trained in each epoch and the per-rank checksums."""
        return {**self.state_dict(), "replica_checksums": self.replica_checksums}

    def state_dict(self) -> dict[str, Any]:
        """The schedule, the stages trainable so far and the per-epoch history, saved in every checkpoint."""
        return {
            "schedule": {str(epoch): stages for epoch, stages in self.schedule.items()},
            "trainable": [s for s in STAGES if s in self.trainable],
            "history": self.history,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the trainable set on resume; it is applied at the next epoch start, before any step."""
        self.trainable = set(state_dict.get("trainable", []))
        self.history = list(state_dict.get("history", []))
        stored = {int(epoch): list(stages) for epoch, stages in state_dict.get("schedule", {}).items()}
        if stored and stored != self.schedule:
            log.warning(
                "callbacks.unfreeze.schedule differs from the checkpoint's (%s); stages already trainable stay "
                "trainable, later milestones follow the new schedule",
                stored,
            )

    def _apply(self, pl_module: L.LightningModule, frozen: list[str]) -> None:
        """Flip requires_grad; the module's train() (called at every epoch start) puts BN modes in line."""
        if not isinstance(pl_module, ClassifierModule):
            raise TypeError(f"ProgressiveUnfreeze trains a ClassifierModule, not a {type(pl_module).__name__}")
        apply_freeze(pl_module.model, frozen, train_bn=pl_module.train_bn)
        pl_module.frozen = frozen
        pl_module.metadata["freeze"] = list(frozen)  # each checkpoint says what was frozen when it was taken
