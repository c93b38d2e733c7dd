"""Each float export format written in-process and read back by its own runtime, with the facts it carries."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torchvision

from retrain.artifacts.metadata import ArtifactMetadata
from retrain.errors import ArtifactError, ConfigError, DataError
from retrain.export.benchmark import Targets, assemble, score, table
from retrain.export.onnx import INPUT, OUTPUT, export_onnx
from retrain.export.program import export_program
from retrain.export.torchscript import export_torchscript
from retrain.inference.deploy_info import deploy_info, from_props, to_props
from retrain.inference.runtimes import FILE_NAMES, detect_kind, eager_runtime, load_runtime
from retrain.tasks.export import _formats, _out_dir, _verification_problem

META = {
    "arch": "resnet18",
    "class_names": ["cat", "dog", "fox"],
    "preprocessing": {"image_size": 32, "resize": 37, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
    "name": "pets",
    "version": 2,
}
INFO = deploy_info(ArtifactMetadata.from_dict(META), "pets@v002")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=3).eval()


def test_metadata_round_trips_through_string_properties(tmp_path: Path) -> None:
    props = to_props(INFO)
    assert all(isinstance(v, str) for v in props.values())
    assert json.loads(props["class_names"]) == ["cat", "dog", "fox"]
    assert from_props(props, tmp_path / "m.onnx") == INFO
    with pytest.raises(ArtifactError, match=r"m\.onnx carries no class_names"):
        from_props({"arch": '"resnet18"'}, tmp_path / "m.onnx")


def _check_runtime(model: torch.nn.Module, path: Path, fmt: str) -> None:
    assert detect_kind(path) == fmt
    runtime = load_runtime(path)
    assert runtime.kind == fmt and runtime.info == INFO
    images = torch.randn(5, 3, 32, 32)  # a batch size the export never saw
    with torch.no_grad():
        expected = model(images)
    assert runtime.predict(images).shape == (5, 3)
    assert torch.allclose(runtime.predict(images), expected, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_torch_export_loads_in_its_runtime_with_any_batch_size_and_its_metadata(
    model, fmt: str, tmp_path: Path
) -> None:
    path = tmp_path / FILE_NAMES[fmt]
    write = export_torchscript if fmt == "torchscript" else export_program
    write(model, torch.randn(2, 3, 32, 32), path, to_props(INFO))
    _check_runtime(model, path, fmt)


def test_onnx_has_named_io_a_dynamic_batch_axis_metadata_props_and_runs_in_onnxruntime(model, tmp_path: Path) -> None:
    path = export_onnx(model, torch.randn(2, 3, 32, 32), tmp_path / "m.onnx", to_props(INFO), opset=23)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == [INPUT] and [o.name for o in proto.graph.output] == [OUTPUT]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value
    assert {op.domain: op.version for op in proto.opset_import}[""] == 23
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == ["cat", "dog", "fox"]
    assert json.loads(props["preprocessing"])["mean"] == [0.5] * 3
    _check_runtime(model, path, "onnx")


def test_a_checkpoint_is_not_mistaken_for_an_export(model, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    assert detect_kind(path) is None
    with pytest.raises(ArtifactError, match=r"weights\.pt is not an exported model"):
        load_runtime(path)


def test_exports_of_a_registry_version_go_to_its_exports_folder(tmp_path: Path) -> None:
    version = tmp_path / "models" / "pets" / "v002"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text("{}")
    (version / "model.safetensors").write_bytes(b"")
    cfg = type("Cfg", (), {"export": type("E", (), {"out_dir": str(tmp_path / "out")})})()
    for source in ("pets@v2", "pets@latest", str(version), str(version / "model.safetensors")):
        assert _out_dir(cfg, source, tmp_path / "models", []) == version.resolve() / "exports"  # type: ignore[arg-type]
    loose = tmp_path / "loose.ckpt"
    loose.write_bytes(b"")
    assert _out_dir(cfg, str(loose), tmp_path / "models", []) == (tmp_path / "out").resolve()  # type: ignore[arg-type]


def test_unknown_formats_are_named() -> None:
    assert _formats(["onnx", "int8", "onnx"]) == ["onnx", "int8"]
    with pytest.raises(Exception, match=r"unknown formats \['tflite'\]"):
        _formats(["onnx", "tflite"])


def _row(acc: float, latency: float, throughput: float, diff: float = 0.0) -> dict:
    return {"file": None, "size_mb": 1.0, "val_images": 100, "val_acc": acc, "agreement": 1.0,
            "max_abs_logit_diff": diff, "latency_ms_b1": latency, "throughput_b32": throughput}  # fmt: skip


def test_missed_targets_are_reported_with_what_was_measured_and_a_failed_onnx_check_stops() -> None:
    rows = {
        "eager": _row(0.90, 10.0, 100.0),
        "onnx": _row(0.90, 5.0, 150.0, diff=3e-4),
        "int8": _row(0.87, 8.0, 150.0, diff=0.2),
    }
    report = assemble(rows, Targets())
    checks = {check["name"]: check for check in report["targets"]}
    assert checks["int8 val accuracy drop vs float (points)"]["measured"] == pytest.approx(3.0)
    assert not checks["int8 val accuracy drop vs float (points)"]["met"]
    assert not checks["int8 batch-32 throughput vs float eager (x)"]["met"]  # 1.5x < 1.8x
    assert checks["onnxruntime batch-1 speed vs eager (x)"]["met"]  # 2x
    text = table(report)
    assert "| int8 | (in memory) |" in text and "MISSED" in text and "(target >= 1.8)" in text
    assert "3.00e-04" in _verification_problem(report, Targets())  # type: ignore[operator]
    rows["onnx"]["max_abs_logit_diff"] = 5e-5
    assert _verification_problem(assemble(rows, Targets()), Targets()) is None


def _tiny(classes: int = 3) -> torch.nn.Module:
    """A network that exports in a second: what these checks need is its number of outputs."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return net.append(torch.nn.Linear(4, classes)).eval()


@pytest.mark.parametrize("opset", [9, 99])
def test_an_onnx_opset_torch_does_not_write_fails_naming_the_opset_written(opset: int, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    with pytest.raises(
        ConfigError,
        match=rf"export\.onnx_opset={opset} was asked for, but .* wrote opset \d+.*Fix: export\.onnx_opset=\d+",
    ):
        export_onnx(_tiny(), torch.randn(2, 3, 8, 8), path, to_props(INFO), opset=opset)
    assert not path.exists()


@pytest.mark.parametrize("names", [["cat", "dog"], ["cat", "dog", "fox", "owl"]])
def test_class_names_that_do_not_match_the_model_outputs_are_refused(names: list[str], tmp_path: Path) -> None:
    props = {**to_props(INFO), "class_names": json.dumps(names)}
    path = export_torchscript(_tiny(), torch.randn(2, 3, 8, 8), tmp_path / FILE_NAMES["torchscript"], props)
    runtime = load_runtime(path)
    with pytest.raises(ArtifactError, match=rf"torchscript\.pt gives logits of shape \(2, 3\).* list {len(names)} cl"):
        runtime.predict(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        ("class_names", ["cat", "dog", "cat"], r"class_names names \['cat'\] more than once"),
        ("class_names", [], r"class_names is \[\], expected a non-empty list"),
        ("preprocessing", {**META["preprocessing"], "mean": [0.5]}, r"preprocessing metadata \(mean is \[0\.5\]"),
        ("preprocessing", {**META["preprocessing"], "resize": 30}, r"preprocessing metadata \(resize is 30"),
        ("preprocessing", {**META["preprocessing"], "crop": -1}, r"preprocessing metadata \(crop is -1"),
    ],
)
def test_tampered_export_metadata_is_refused_naming_the_file_and_field(field, value, said, tmp_path: Path) -> None:
    props = {**to_props(INFO), field: json.dumps(value)}
    with pytest.raises(ArtifactError, match=rf"m\.onnx has damaged .*{said}"):
        from_props(props, tmp_path / "m.onnx")


def test_a_check_measured_on_no_validation_images_is_refused_not_met() -> None:
    with pytest.raises(DataError, match=r"No validation images were scored.*Fix: check data\.root"):
        score({"eager": eager_runtime(_tiny(), INFO)}, [])
