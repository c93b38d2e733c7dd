"""Class balance: the loss weights of model.class_weights and the draws of data.sampler=balanced."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf
from torch.utils.data import DistributedSampler

from retrain.data.balance import BalancedSampler, check_sampler, loss_weights
from retrain.data.datamodule import ImageFolderDataModule
from retrain.data.splits import discover
from retrain.errors import ConfigError, DataError

COUNTS = {"cat": 100, "dog": 10, "fox": 10}


def test_balanced_weights_follow_sklearn_n_over_k_times_count() -> None:
    weights = loss_weights("balanced", COUNTS)
    # n / (k * count_c) = 120 / (3 * count_c): the rare classes weigh 10x the common one.
    assert weights == pytest.approx([0.4, 4.0, 4.0])
    assert loss_weights("balanced", {"a": 5, "b": 5}) == [1.0, 1.0]


def test_no_weights_and_an_explicit_list_per_class() -> None:
    assert loss_weights(None, COUNTS) is None
    assert loss_weights("none", COUNTS) is None
    assert loss_weights(OmegaConf.create([1, 5, 5.5]), COUNTS) == [1.0, 5.0, 5.5]


@pytest.mark.parametrize("setting", [[1, 2], [1, 2, -1], [1, "x", 2], "rare", 3])
def test_a_wrong_setting_names_the_classes_and_the_fix(setting: object) -> None:
    with pytest.raises(ConfigError, match=r"Fix: .*model.class_weights") as error:
        loss_weights(setting, COUNTS)
    assert "cat" in str(error.value)


def test_balanced_weights_need_every_class_in_train() -> None:
    with pytest.raises(DataError, match="fox"):
        loss_weights("balanced", {"cat": 3, "fox": 0})


def test_check_sampler_names_the_choices() -> None:
    assert check_sampler("balanced") == "balanced"
    with pytest.raises(ConfigError, match="shuffle draws every image"):
        check_sampler("weighted")


LABELS = [0] * 90 + [1] * 5 + [2] * 5


def test_balanced_sampler_draws_every_class_about_equally_often() -> None:
    sampler = BalancedSampler(LABELS, seed=3)
    drawn: Counter[int] = Counter()
    for epoch in range(10):
        sampler.set_epoch(epoch)
        drawn.update(LABELS[i] for i in sampler)
    assert sum(drawn.values()) == 10 * len(LABELS)  # an epoch is as long as the dataset
    assert all(250 <= drawn[label] <= 420 for label in (0, 1, 2)), drawn  # 333 each on average; 900/50/50 unbalanced


def test_the_draw_replays_for_the_same_seed_and_epoch_and_changes_with_the_epoch() -> None:
    first, again = BalancedSampler(LABELS, seed=1), BalancedSampler(LABELS, seed=1)
    first.set_epoch(4)
    again.set_epoch(4)
    assert list(first) == list(again)  # what a resumed run draws for the epoch it continues with
    again.set_epoch(5)
    assert list(first) != list(again)


def test_ranks_take_disjoint_shards_of_one_global_draw() -> None:
    one = BalancedSampler(LABELS, seed=7)
    ranks = [BalancedSampler(LABELS, seed=7, num_replicas=4, rank=r) for r in range(4)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    shards = [list(sampler) for sampler in ranks]
    assert [len(shard) for shard in shards] == [25] * 4
    interleaved = [shard[i] for i in range(25) for shard in shards]
    assert interleaved == list(one)  # position p of the global draw goes to rank p % 4, and to no other rank


def test_the_train_loader_of_a_ddp_rank_draws_its_shard_for_the_resumed_epoch(imagefolder: Path) -> None:
    splits = discover(imagefolder)
    data = ImageFolderDataModule(splits, image_size=32, num_workers=0, pin_memory=False, sampler="balanced")
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))  # a fit resumed after 3 epochs
    data.trainer = SimpleNamespace(world_size=2, global_rank=1, fit_loop=SimpleNamespace(epoch_progress=progress))
    sampler = data.train_dataloader().sampler
    # A DistributedSampler: Lightning neither replaces nor wraps it under DDP, and calls its set_epoch.
    assert isinstance(sampler, BalancedSampler) and isinstance(sampler, DistributedSampler)
    assert (sampler.num_replicas, sampler.rank, sampler.epoch) == (2, 1, 3)
    assert len(sampler) == len(data.splits.samples["train"]) // 2
    plain = ImageFolderDataModule(discover(imagefolder), image_size=32, num_workers=0).train_dataloader()
    assert not isinstance(plain.sampler, BalancedSampler)
