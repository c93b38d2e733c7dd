"""The speed knobs, through the CLI: each run trains and predicts what the plain fp32 run predicts, within tolerance.

Runs start from the same seed and train the same 2 batches (augment=none: the data is identical whatever the
loader workers do); the test then evaluates every checkpoint in fp32, so any difference comes from training
under the knob. The backbone is frozen: full fine-tuning from a random init amplifies any change in rounding
(bf16's, or compile's reordered fp32 sums) into differences as large as the training steps themselves
(measured), which would test nothing. On a CPU, Lightning runs `trainer.precision=16-mixed` as bf16-mixed and
says so, so that run covers both.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from clitools import FAST, CliResult, assert_ok, run_cli
from torchvision.models import resnet18

pytestmark = pytest.mark.e2e
SHORT = (
    *FAST,
    "data.augment=none",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",  # validation would compile a second (eval) graph: minutes on a CI CPU
    "test=false",
    "save.publish=false",
    "model.freeze=true",
    "model.feature_cache=false",  # the cache would compute the features once, outside the knob
    "model.bn_stats=frozen",  # adapting under each knob would give each run its own statistics
    "~callbacks.report",
)
KNOBS = {
    "fp32": ("trainer.precision=32",),
    "compiled": (
        "model.compile=true",
        "model.channels_last=true",
        "data.num_workers=1",  # after FAST's 0
        "data.persistent_workers=false",
        "data.prefetch_factor=4",
        "data.pin_memory=false",
    ),
    "half": ("trainer.precision=16-mixed",),
}
# Two training steps move these probabilities by about 5e-2; compile moved them by 1e-7, bf16 by 8e-4 (measured).
TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path) -> dict[str, CliResult]:
    """One short training run per knob setting, each in its own folder."""
    out = {}
    for name, knobs in KNOBS.items():
        cwd = tmp_path_factory.mktemp(name)
        result = run_cli(
            "train.py", f"data.root={imagefolder}", *SHORT, *knobs, cwd=cwd, env={"PYTHONWARNINGS": "default"}
        )
        assert_ok(result)
        out[name] = result
    return out


def last_checkpoint(result: CliResult) -> dict[str, torch.Tensor]:
    """The state_dict of the run's last.ckpt, as Lightning wrote it."""
    path = result.runs()[-1] / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def predictions(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Class probabilities of a plain, uncompiled torchvision resnet18 loaded strictly from a checkpoint."""
    net = resnet18(num_classes=3)
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return net.eval()(images).softmax(dim=1)


def test_a_compiled_model_saves_plain_keys_that_load_into_an_uncompiled_resnet(runs) -> None:
    state = last_checkpoint(runs["compiled"])
    assert not [k for k in state if "_orig_mod" in k]
    assert "model.conv1.weight" in state
    predictions(state)  # strict load into torchvision's resnet18


def test_compile_and_channels_last_predict_what_fp32_predicts(runs) -> None:
    reference = predictions(last_checkpoint(runs["fp32"]))
    compiled = predictions(last_checkpoint(runs["compiled"]))
    assert (compiled - reference).abs().max() < TOLERANCE


def test_16_mixed_runs_as_bf16_on_cpu_and_predicts_what_fp32_predicts(runs) -> None:
    assert "Using `precision='bf16-mixed'` instead" in runs["half"].output
    reference = predictions(last_checkpoint(runs["fp32"]))
    half = predictions(last_checkpoint(runs["half"]))
    assert (half - reference).abs().max() < TOLERANCE
