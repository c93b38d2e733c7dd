"""model.class_weights in the training loss, and balanced accuracy (val/bal_acc) as a metric fit logs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from retrain.model.module import ClassifierModule, logged_metric_names


def _module(**kwargs: object) -> ClassifierModule:
    return ClassifierModule(nn.Linear(4, 3), ["cat", "dog", "fox"], **kwargs)  # type: ignore[arg-type]


def test_class_weights_weight_the_training_loss_only_and_stay_out_of_the_state_dict() -> None:
    module = _module(class_weights=[0.4, 4.0, 4.0])
    logits, labels = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 0, 0, 0, 1, 2])
    weighted = F.cross_entropy(logits, labels, weight=torch.tensor([0.4, 4.0, 4.0]))
    assert torch.allclose(module.train_criterion(logits, labels), weighted)
    assert torch.allclose(module.criterion(logits, labels), F.cross_entropy(logits, labels))  # val/test: plain
    # A checkpoint of a run with weights resumes in a run without them, and the reverse.
    assert module.state_dict().keys() == _module().state_dict().keys()


def test_balanced_accuracy_is_the_mean_recall_and_can_be_monitored() -> None:
    assert {"val/bal_acc", "train/bal_acc"} <= set(logged_metric_names(3))
    metrics = _module().val_metrics
    # 8 cats all right, 1 of 2 dogs, 0 of 2 foxes: accuracy 9/12 = 0.75 hides the rare classes' 0.5 and 0.
    labels = torch.tensor([0] * 8 + [1, 1, 2, 2])
    predicted = torch.tensor([0] * 8 + [1, 0, 0, 0])
    metrics.update(F.one_hot(predicted, 3).float(), labels)
    values = metrics.compute()
    assert float(values["val/acc"]) == 0.75
    assert abs(float(values["val/bal_acc"]) - (1.0 + 0.5 + 0.0) / 3) < 1e-6


def test_balanced_accuracy_leaves_out_a_class_with_no_image_in_the_split() -> None:
    # A fold without a fox that predicts one: scikit-learn, the report and the TTA table average the recalls of
    # cats and dogs (1/3 and 1); torchmetrics' macro accuracy counted the fox as recall 0 too (0.4444).
    metrics = _module().val_metrics
    labels, predicted = torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([2, 2, 0, 1, 1, 1])
    metrics.update(F.one_hot(predicted, 3).float(), labels)
    assert abs(float(metrics.compute()["val/bal_acc"]) - (1 / 3 + 1) / 2) < 1e-6
