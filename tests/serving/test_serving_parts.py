"""The server's parts without a server: settings, the watch check, auto's backend choice and the batcher."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from retrain.errors import ArtifactError, ConfigError
from retrain.export.onnx import export_onnx
from retrain.inference.deploy_info import deploy_info, to_props
from retrain.inference.runtimes import FILE_NAMES
from retrain.model.loading import load_trained
from retrain.serving.backends import version_folder
from retrain.serving.batcher import Batcher
from retrain.serving.hot_swap import check_watchable
from retrain.serving.metrics import ServeMetrics
from retrain.serving.served_model import load_served_model
from retrain.serving.server import stop_cleanly_before_serving
from retrain.serving.settings import ServeSettings

CLASSES = ("cat", "dog", "fox")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backend": "fastest"}, "serve.backend='fastest' is unknown"),
        ({"max_batch_size": 0}, "serve.max_batch_size=0"),
        ({"batch_timeout_ms": -1}, "serve.batch_timeout_ms=-1"),
        ({"port": 70000}, "serve.port=70000 is not a TCP port"),
        ({"host": "my-laptop"}, "serve.host='my-laptop' is not an IP address"),
    ],
)
def test_a_wrong_setting_is_refused_before_anything_loads(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"Fix:|expected") as caught:
        ServeSettings.from_config(values)
    assert message in str(caught.value)


def test_only_a_loopback_host_is_private() -> None:
    assert not ServeSettings.from_config({}).public
    assert ServeSettings.from_config({"host": "0.0.0.0"}).public


def test_watch_needs_a_reference_that_moves(tmp_path: Path, make_version) -> None:
    models = tmp_path / "models"
    folder = make_version(models, seed=0, classes=CLASSES)
    check_watchable("cats@latest", version_folder("cats@latest", models))
    check_watchable("cats", version_folder("cats", models))
    for fixed in ("cats@v001", str(folder)):
        with pytest.raises(ConfigError, match="ckpt_path=cats@latest"):
            check_watchable(fixed, version_folder(fixed, models))


def test_auto_measures_every_full_precision_backend_and_says_which_won(tmp_path: Path, make_version) -> None:
    models = tmp_path / "models"
    folder = make_version(models, seed=0, classes=CLASSES)
    net, meta = load_trained(str(folder), model_dir=models)
    props = to_props(deploy_info(meta, "cats@v001"))
    onnx = export_onnx(net, torch.randn(2, 3, 32, 32), folder / "exports" / FILE_NAMES["onnx"], props, opset=23)
    settings = ServeSettings.from_config({"max_batch_size": 4})
    model = load_served_model("cats@latest", settings, model_dir=models, allow_pickle=False)
    assert model.label == "cats@v001" and model.folder == folder.resolve()
    assert set(model.backend.ms_per_image) == {"eager", "onnx"}
    assert model.backend.kind == min(model.backend.ms_per_image, key=model.backend.ms_per_image.__getitem__)
    assert "fastest of 2 measured" in model.backend.reason and "int8 is never auto-picked" in model.backend.reason
    kept = load_served_model("cats@latest", settings, model_dir=models, allow_pickle=False, keep="onnx")  # a swap
    assert (kept.backend.kind, kept.backend.ms_per_image) == ("onnx", {})
    assert "kept from the version before" in kept.backend.reason
    exported = load_served_model(str(onnx), settings, model_dir=models, allow_pickle=False)  # the file alone
    assert (exported.label, exported.backend.kind, exported.folder) == ("cats@v001", "onnx", None)
    assert "only full-precision backend" in exported.backend.reason
    with pytest.raises(ConfigError, match=r"offers only \['eager', 'onnx'\].*formats=\[int8\]"):
        load_served_model("cats@latest", ServeSettings(backend="int8"), model_dir=models, allow_pickle=False)


def test_an_export_with_other_classes_than_its_version_is_never_served_under_the_version(
    tmp_path: Path, make_version
) -> None:
    # exports/ is not in the registry's digests: an ONNX with the class names reversed answered "triangle" for a
    # circle as "demo@v001" (auto picked it for speed), and `retrain registry verify` said ok.
    models = tmp_path / "models"
    folder = make_version(models, seed=0, classes=CLASSES)
    net, meta = load_trained(str(folder), model_dir=models)
    info = dataclasses.replace(deploy_info(meta, "cats@v001"), class_names=list(reversed(CLASSES)))
    onnx = export_onnx(
        net, torch.randn(2, 3, 32, 32), folder / "exports" / FILE_NAMES["onnx"], to_props(info), opset=23
    )
    settings = ServeSettings.from_config({"max_batch_size": 4})
    model = load_served_model("cats@latest", settings, model_dir=models, allow_pickle=False)
    assert model.backend.kind == "eager" and "onnx could not be loaded" in model.backend.reason
    for source, backend in (("cats@latest", "onnx"), (str(onnx), "auto")):
        with pytest.raises(ArtifactError, match=r"does not carry the class_names of the version it sits in"):
            load_served_model(source, ServeSettings(backend=backend), model_dir=models, allow_pickle=False)


def test_weights_from_outside_the_registry_are_named_by_their_path(tmp_path: Path, make_version) -> None:
    # A run's last.ckpt carries the name and version its run reserved, but not the weights published there: it was
    # served as "demo@v001" while demo@v001 answered otherwise. Outside a version folder, the path names the model.
    models = tmp_path / "models"
    folder = make_version(models, seed=0, classes=CLASSES)
    outside = tmp_path / "run" / "checkpoints" / "model.safetensors"
    outside.parent.mkdir(parents=True)
    shutil.copy(folder / "model.safetensors", outside)
    settings = ServeSettings(backend="eager")
    for source, label in ((str(outside), str(outside)), (str(folder / "model.safetensors"), "cats@v001")):
        assert load_served_model(source, settings, model_dir=models, allow_pickle=False).label == label


class FakeModel:
    """Stands in for a ServedModel: answers each image with (its name, the image's value), records batch sizes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches: list[int] = []

    def answer(self, images: torch.Tensor) -> list[list[tuple[str, float]]]:
        self.batches.append(len(images))
        return [[(self.name, float(image.flatten()[0]))] for image in images]


def test_batches_are_capped_hold_one_version_each_and_answer_in_order() -> None:
    old, new = FakeModel("old"), FakeModel("new")

    async def scenario() -> list:
        batcher = Batcher(max_batch_size=3, timeout_ms=50, metrics=ServeMetrics())
        runner = asyncio.create_task(batcher.run())
        # Queued while the batcher waits: four images for the old version, then one for the new (a hot swap).
        jobs = [batcher.submit(old, torch.full((1,), float(i))) for i in range(4)]
        jobs.append(batcher.submit(new, torch.full((1,), 9.0)))
        answers = await asyncio.gather(*jobs)
        await batcher.close(runner)
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[("old", 0.0)], [("old", 1.0)], [("old", 2.0)], [("old", 3.0)], [("new", 9.0)]]
    assert old.batches == [3, 1] and new.batches == [1]


def test_a_lone_image_goes_at_once_and_a_batch_waits_only_for_images_being_decoded() -> None:
    model = FakeModel("m")

    async def scenario() -> None:
        batcher = Batcher(max_batch_size=8, timeout_ms=600_000, metrics=ServeMetrics())
        runner = asyncio.create_task(batcher.run())
        # Nothing else on its way: no waiting for the (ten-minute) timeout.
        assert await asyncio.wait_for(batcher.submit(model, torch.zeros(1)), 60) == [("m", 0.0)]
        first = asyncio.create_task(batcher.submit(model, torch.ones(1)))
        with batcher.coming():  # a second upload is being decoded: the batch waits for it
            for _ in range(5):
                await asyncio.sleep(0)
            assert not first.done()
        second = await asyncio.wait_for(batcher.submit(model, torch.full((1,), 2.0)), 60)
        assert (await first, second) == ([("m", 1.0)], [("m", 2.0)])
        await batcher.close(runner)

    asyncio.run(scenario())
    assert model.batches == [1, 2]


def test_sigterm_while_the_model_loads_stops_with_exit_0_and_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, stop_cleanly_before_serving():
        os.kill(os.getpid(), signal.SIGTERM)  # what a supervisor cancelling a roll-out sends mid-load
    assert stopped.value.code == 0  # a clean stop, not "killed by SIGTERM" (143)
    assert signal.getsignal(signal.SIGTERM) == before
