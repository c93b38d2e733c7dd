"""Config mistakes: a typo'd key gets the closest valid key; a value of the wrong type is named before data is read."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pytest
from clitools import REPO, composed
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from retrain.errors import ConfigError
from retrain.utils.cli import _accepts, check_types, override_hints

CONF = REPO / "conf"


def hints(*overrides: str, config: str = "train") -> list[str]:
    return override_hints(list(overrides), config_dir=CONF, config_name=config, script=f"{config}.py")


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("model.frezze=true", "model.freeze"),
        ("trainer.max_epoch=3", "trainer.max_epochs"),
        ("trainr.max_epochs=3", "trainer.max_epochs"),  # a typo in the group part
        ("trainr=cpu", "trainer"),  # a config group
        ("model.optimizer.momentun=0.8", "model.optimizer.momentum"),
    ],
)
def test_a_typo_gets_the_closest_valid_key(typo: str, meant: str) -> None:
    (hint,) = hints("data.root=/x", typo)
    key = typo.split("=")[0]
    assert hint.startswith(f"hint: {key} is not a key of this config; did you mean {meant}?")
    assert "python train.py --cfg job" in hint


def test_keys_that_a_group_override_brings_count_as_valid() -> None:
    # early_stopping exists only in callbacks=early_stopping; model.optimizer.betas only with adamw.
    assert hints("callbacks=early_stopping", "callbacks.early_stopping.patience=2") == []
    assert hints("model/optimizer=adamw", "model.optimizer.betas=[0.9,0.99]") == []
    (hint,) = hints("callbacks.early_stopping.patience=2")
    assert "callbacks.early_stopping.patience is not a key" in hint


def test_valid_overrides_appends_and_sweeps() -> None:
    assert hints("model.freeze=true", "+extra.note=hi", "trainer=cpu", "hydra.run.dir=/tmp/x") == []
    (hint,) = hints("model.frezze=true,false")  # a sweep is checked by its key
    assert "did you mean model.freeze?" in hint


def test_a_key_with_no_look_alike_says_how_to_list_the_keys() -> None:
    assert hints("zzzz.qqqq=1", config="eval") == [
        "hint: zzzz.qqqq is not a key of this config; `python eval.py --cfg job` prints every key."
    ]


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("data.batch_size=big", "Value 'big' of type 'str' could not be converted to Integer"),
        ("model.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
        ("data.pin_memory=maybe", "Value 'maybe' is not a valid bool"),
        ("model.prune.amount=most", "Value 'most' of type 'str' could not be converted to Float"),
    ],
)
def test_hydra_types_data_and_model_keys_while_composing(tmp_path: Path, override: str, said: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        composed(tmp_path, override)
    cause = str(info.value.__cause__)
    assert said in cause and f"full_key: {override.split('=')[0]}" in cause
    assert hints(override) == []  # the key exists: Hydra's message is the whole story


def test_keys_of_several_types_and_interpolations_still_compose(tmp_path: Path) -> None:
    cfg = composed(tmp_path, "model.freeze=[stem,layer1]", "model.channels_last=auto", "model.stage_lr_mult={fc: 1}")
    assert list(cfg.model.freeze) == ["stem", "layer1"] and cfg.model.channels_last == "auto"
    cfg = composed(tmp_path, "experiment=retrain", "name=pets", "data=demo", "model.freeze=true", "model.lr=1")
    assert cfg.model.init_from == "pets@latest" and cfg.data.root == f"{tmp_path}/data/demo"
    assert cfg.model.freeze is True and cfg.model.lr == 1.0
    # Every key the yaml files set is in the schema, and the reverse: nothing is left `???`.
    assert OmegaConf.missing_keys(cfg.data) == set() and OmegaConf.missing_keys(cfg.model) == set()


def test_a_wrong_type_names_the_key_the_type_and_a_fix() -> None:
    cfg = OmegaConf.create({"opt": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": "fast"}})
    with pytest.raises(ConfigError) as info:
        check_types(cfg)
    message = str(info.value)
    assert message.startswith("opt.momentum=fast has the wrong type: torch.optim.SGD takes momentum as float")
    assert "Fix: pass e.g. opt.momentum=0.01." in message


def test_the_key_the_user_typed_is_named_before_a_copy_of_it() -> None:
    cfg = OmegaConf.create(
        {
            "sched": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": "${epochs}"},
            "epochs": "abc",
        }
    )
    with pytest.raises(ConfigError, match=r"sched.step_size=\$\{epochs\} \(= 'abc'\) has the wrong type"):
        check_types(cfg)


def test_values_of_the_right_type_and_unknown_targets_pass() -> None:
    cfg = OmegaConf.create(
        {
            "opt": {"_target_": "torch.optim.SGD", "momentum": 0.9, "nesterov": False, "lr": 1},
            "sched": {"_target_": "torch.optim.lr_scheduler.StepLR", "step_size": 3},
            "other": {"_target_": "no.such.Thing", "x": "y"},  # instantiate reports it, with its own message
        }
    )
    check_types(cfg)


@pytest.mark.parametrize(
    ("value", "hint", "verdict"),
    [
        ("abc", Optional[int], False),  # noqa: UP045 (typing.Optional, as Lightning spells its annotations)
        (None, Optional[int], True),  # noqa: UP045
        ("abc", int | None, False),
        (3, int, True),
        (True, int, False),
        (3, float, True),
        ("warn", bool | Literal["warn"] | None, True),
        ("maybe", bool | Literal["warn"] | None, False),
        (1, Literal[True], False),
        ("x", int | list[int], None),  # list[int] is beyond this check: the class decides
        ("x", str | int, True),
    ],
)
def test_accepts_decides_only_what_it_can(value: object, hint: object, verdict: bool | None) -> None:
    assert _accepts(value, hint) is verdict
