"""Shipping, as a user runs it: train with pruning, export every format, use each file without retrain, QAT."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from clitools import FAST, assert_ok, run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e
# AdamW on the eval transforms learns the colour-coded classes in a few epochs, so predictions can be checked.
LEARNS = ("model/optimizer=adamw", "model.lr=0.003", "data.augment=none", "trainer.max_epochs=4")
PRUNE = ("model.prune.amount=0.3", "model.prune.method=l1_unstructured")
NO_REPORT = "~callbacks.report"  # the run report is tested where it is the subject (test_loggers_cli)
QUICK_EXPORT = ("export.calib_images=8", "export.bench.warmup=1", "export.bench.runs=2", "data.num_workers=0")
FORMATS = ("torchscript", "export", "onnx", "int8")


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory, imagefolder: Path):
    """A pruned model trained and published as resnet18@v001, then exported in every format."""
    cwd = tmp_path_factory.mktemp("ship")
    trained = run_cli("train.py", f"data.root={imagefolder}", *FAST, *LEARNS, *PRUNE, NO_REPORT, cwd=cwd)
    assert_ok(trained)
    exported = run_cli("export.py", "ckpt_path=resnet18@latest", *QUICK_EXPORT, cwd=cwd)
    assert_ok(exported)
    exported.first = trained.results()
    return exported


def test_pruned_model_is_published_as_a_plain_state_dict_with_its_sparsity(shipped) -> None:
    results = shipped.first
    sparsity = results["prune"]["sparsity"]
    assert set(sparsity) == {"stem", "layer1", "layer2", "layer3", "layer4", "all"}
    assert all(value == pytest.approx(0.3, abs=0.01) for value in sparsity.values())
    version = Path(results["registry"]["path"])
    assert json.loads((version / "metadata.json").read_text())["prune"]["sparsity"] == sparsity
    state = torch.load(version / "weights.pth", weights_only=True)
    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict(state)  # strict: no weight_orig / weight_mask left
    convs = [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    zeros = sum(int((w == 0).sum()) for w in convs) / sum(w.numel() for w in convs)
    assert zeros == pytest.approx(0.3, abs=0.01)
    assert results["test"]["test/acc"] >= 0.9  # retraining after pruning still learns the classes


def test_every_format_lands_in_the_version_verified_and_measured(shipped) -> None:
    exports = shipped.cwd / "models" / "resnet18" / "v001" / "exports"
    report = json.loads((exports / "export_report.json").read_text())
    assert list(report["formats"]) == ["eager", *FORMATS]
    for name, row in report["formats"].items():
        assert row["val_images"] == 12
        assert row["latency_ms_b1"] > 0 and row["throughput_b32"] > 0 and row["size_mb"] > 0
        if name != "eager":
            assert Path(row["file"]).parent == exports
    float_formats = [report["formats"][name] for name in ("torchscript", "export", "onnx")]
    assert all(row["agreement"] == 1.0 and row["max_abs_logit_diff"] <= 1e-4 for row in float_formats)
    int8 = report["formats"]["int8"]
    assert int8["size_mb"] < report["formats"]["onnx"]["size_mb"] / 3  # int8 weights
    assert abs(int8["val_acc"] - report["formats"]["eager"]["val_acc"]) <= 0.1  # 12 images: 1 image is 8 points
    assert {check["name"] for check in report["targets"]} >= {"onnx max abs logit diff vs PyTorch"}
    assert all(isinstance(check["met"], bool) for check in report["targets"])
    assert "| int8 | model.int8.pt2 |" in shipped.stdout and "target" in shipped.stdout
    info = json.loads((exports / "preprocessing.json").read_text())
    assert info["class_names"] == ["cat", "dog", "fox"] and info["preprocessing"]["crop"] == 32


# Runs in a fresh interpreter where `import retrain` fails: only torch, onnxruntime, PIL and numpy.
WITHOUT_RETRAIN = textwrap.dedent(
    """
    import json, sys
    sys.modules["retrain"] = None  # `import retrain` now raises ImportError
    try:
        import retrain
        sys.exit("retrain is importable")
    except ImportError:
        pass
    import numpy as np, onnxruntime, torch
    from PIL import Image

    exports, image_path = sys.argv[1], sys.argv[2]
    info = json.load(open(f"{exports}/preprocessing.json"))
    pre = info["preprocessing"]
    img = Image.open(image_path).convert("RGB")
    w, h = img.size
    scale = pre["resize"] / min(w, h)
    img = img.resize((max(pre["resize"], int(w * scale)), max(pre["resize"], int(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = int(round((w - pre["crop"]) / 2)), int(round((h - pre["crop"]) / 2))
    img = img.crop((left, top, left + pre["crop"], top + pre["crop"]))
    x = (np.asarray(img, dtype=np.float32) / 255 - pre["mean"]) / pre["std"]
    # C-contiguous, as preprocessing.json's input_layout says: the compiled int8 package relies on it.
    batch = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32))

    logits = {
        "torchscript": lambda: torch.jit.load(f"{exports}/model.torchscript.pt")(batch),
        "export": lambda: torch.export.load(f"{exports}/model.pt2").module()(batch),
        "onnx": lambda: torch.from_numpy(
            onnxruntime.InferenceSession(f"{exports}/model.onnx").run(["logits"], {"images": batch.numpy()})[0]
        ),
        "int8": lambda: torch._inductor.aoti_load_package(f"{exports}/model.int8.pt2")(batch),
    }
    with torch.no_grad():
        print(json.dumps({fmt: info["class_names"][int(run().argmax())] for fmt, run in logits.items()}))
    """
)


def test_each_exported_file_predicts_an_image_without_retrain_installed(shipped, imagefolder: Path) -> None:
    exports = shipped.cwd / "models" / "resnet18" / "v001" / "exports"
    image = imagefolder / "val" / "dog" / "001.jpg"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_RETRAIN, str(exports), str(image)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=shipped.cwd,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == dict.fromkeys(FORMATS, "dog")


def test_qat_fine_tunes_a_float_version_and_publishes_its_int8_export(shipped, imagefolder: Path) -> None:
    result = run_cli(
        "train.py",
        f"data.root={imagefolder}",
        "experiment=qat",
        "model.init_from=resnet18@v001",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "qat.bench.warmup=1",
        "qat.bench.runs=2",
        NO_REPORT,
        *FAST,
        cwd=shipped.cwd,
    )
    assert_ok(result)
    version = shipped.cwd / "models" / "resnet18-qat" / "v001"
    meta = json.loads((version / "metadata.json").read_text())
    assert meta["quantization"] == "qat" and meta["parent"]["name"] == "resnet18" and meta["parent"]["version"] == 1
    report = json.loads((version / "exports" / "export_report.json").read_text())
    assert list(report["formats"]) == ["eager", "int8"] and (version / "exports" / "model.int8.pt2").is_file()
    assert report["formats"]["int8"]["agreement"] >= 0.75
    # The fine-tuned float weights are published as plain torchvision keys, without fake-quantizer state.
    assert not [k for k in load_file(version / "model.safetensors") if "activation_post_process" in k]
    torchvision.models.resnet18(num_classes=3).load_state_dict(torch.load(version / "weights.pth", weights_only=True))
