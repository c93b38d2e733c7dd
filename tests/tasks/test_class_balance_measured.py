"""On a lopsided folder (one class 10x the others), either balance option wins the small classes back.

Three short seeded runs of the real training task, in one process: the default, model.class_weights=balanced and
data.sampler=balanced. Trained on the raw counts, the model guesses the large class wherever the grey levels
overlap; both options move that border back, and val (balanced, 40 images a class) shows it in val/bal_acc.
Measured here: default 0.475, class weights 0.750, sampler 0.725 (with the folder's seed 1: 0.458, 0.700, 0.667;
with 10 images a class instead of 20 the gains vary from 0.03 to 0.42, too close to the margin to test with).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _imbalanced import imbalanced_imagefolder
from clitools import FAST, composed

from retrain.tasks.train import train

SHORT_RUN = (
    "trainer.max_epochs=5",
    "data.batch_size=16",
    "data.augment=none",
    "monitor=val/bal_acc",
    "test=false",
    "save.publish=false",
    "callbacks=none",
    "~logger",
    "trainer.num_sanity_val_steps=0",
)
MARGIN = 0.1  # balanced accuracy points each option must gain over the default


def bal_acc_after_training(tmp_path: Path, root: Path, *options: str) -> float:
    """val/bal_acc of the last epoch of a short run."""
    tmp_path.mkdir()
    results = train(composed(tmp_path, f"data.root={root}", *FAST, *SHORT_RUN, *options))
    return float(results["final"]["val/bal_acc"])


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Balanced accuracy of the three runs on one folder: 200 / 20 / 20 train images, 40 a class in val."""
    tmp = tmp_path_factory.mktemp("imbalanced")
    root = imbalanced_imagefolder(tmp / "images", small=20, val=40, seed=0)
    options = {
        "default": (),
        "class_weights": ("model.class_weights=balanced",),
        "sampler": ("data.sampler=balanced",),
    }
    return {name: bal_acc_after_training(tmp / name, root, *extra) for name, extra in options.items()}


@pytest.mark.parametrize("option", ["class_weights", "sampler"])
def test_a_balance_option_raises_balanced_accuracy_over_the_default(scores: dict[str, float], option: str) -> None:
    assert scores[option] >= scores["default"] + MARGIN, scores
