"""The server as clients use it: every endpoint, the three ways to send an image, and bad uploads among good ones.

One server (cats@latest, a random 3-class ResNet18 at 32 px) answers every test of this module; predict.py runs
on the same photos beforehand, and the server must give its answers.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from clitools import REPO

pytestmark = pytest.mark.e2e

CLASSES = ("cat", "dog", "fox")
PHOTOS = {"a.jpg": (32, 32), "b.jpg": (48, 40), "c.png": (64, 64), "d.jpg": (40, 56), "e.jpg": (120, 90)}
MAX_BODY_MB = 0.05  # 52 KB: the photos fit, TOO_BIG does not
TOO_BIG = b"\xff\xd8\xff" + bytes(80_000)


@pytest.fixture(scope="module")
def site(tmp_path_factory, make_version, make_photo, start_server) -> SimpleNamespace:
    """A registry with cats@v001, photos, predict.py's answers for them, and the server."""
    root = tmp_path_factory.mktemp("serve")
    make_version(root / "models", seed=0, classes=CLASSES)
    photos = root / "photos"
    photos.mkdir()
    for i, (name, size) in enumerate(PHOTOS.items()):
        (photos / name).write_bytes(make_photo(i, size, "PNG" if name.endswith(".png") else "JPEG"))
    predict = subprocess.Popen(
        [sys.executable, str(REPO / "predict.py"), "ckpt_path=cats@v001", f"input={photos}", "output=preds.json"],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    server = start_server(
        root,
        "ckpt_path=cats@latest",
        f"serve.max_body_mb={MAX_BODY_MB}",
        "serve.max_batch_size=8",
        "serve.batch_timeout_ms=20",
    )
    out, _ = predict.communicate(timeout=600)
    assert predict.returncode == 0, out.decode()[-4000:]
    rows = json.loads((root / "preds.json").read_text())
    expected = {Path(r["path"]).name: [(t["label"], t["prob"]) for t in r["top_k"]] for r in rows}
    return SimpleNamespace(server=server, url=server.url, photos=photos, expected=expected)


@pytest.fixture
def client(site) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=site.url, timeout=120) as c:
        yield c


def assert_predict_py_answer(body: dict[str, Any], expected: list[tuple[str, float]]) -> None:
    """Same labels in the same order and the same probabilities (to the 6 decimals both print) as predict.py."""
    got = [(p["label"], p["p"]) for p in body["probabilities"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    # Batches of another size may move the last printed digit (float sums in another order), never more.
    assert all(abs(p - q) <= 1.01e-6 for (_, p), (_, q) in zip(got, expected, strict=True)), (got, expected)
    assert body["label"] == expected[0][0]


def test_health_and_info_describe_the_loaded_model(site, client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "cats@v001"}
    info = client.get("/info").json()
    assert info["model"] == "cats@v001" and info["class_names"] == list(CLASSES)
    assert info["preprocessing"]["crop"] == 32 and info["preprocessing"]["resize"] == 37
    assert info["backend"]["kind"] == "eager" and info["backend"]["device"] == "cpu"
    assert "only full-precision backend" in info["backend"]["reason"]  # why: no exports/ in the version
    assert info["batching"] == {"max_batch_size": 8, "batch_timeout_ms": 20}
    assert info["limits"]["max_body_mb"] == MAX_BODY_MB and info["watch"]["enabled"] is False


def test_one_image_sent_three_ways_gets_predict_py_answer(site, client: httpx.Client) -> None:
    data = (site.photos / "b.jpg").read_bytes()
    raw = client.put("/predict", content=data)  # what `curl -T b.jpg URL/predict` sends: PUT, no content type
    multipart = client.post("/predict", files={"file": ("b.jpg", data, "image/jpeg")})
    as_json = client.post("/predict", json={"image": base64.b64encode(data).decode()})
    data_url = client.post("/predict", json={"image": "data:image/jpeg;base64," + base64.b64encode(data).decode()})
    for response in (raw, multipart, as_json, data_url):
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "cats@v001"
        assert_predict_py_answer(response.json(), site.expected["b.jpg"])


def test_concurrent_requests_share_batches_and_match_predict_py(site, client: httpx.Client) -> None:
    names = list(PHOTOS) * 4
    batches_before = site.server.metric(client, "retrain_serve_batch_size_count")

    def ask(name: str) -> httpx.Response:
        return client.post(
            "/predict", content=(site.photos / name).read_bytes(), headers={"Content-Type": "image/jpeg"}
        )

    with ThreadPoolExecutor(len(names)) as pool:
        responses = list(pool.map(ask, names))
    for name, response in zip(names, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_predict_py_answer(response.json(), site.expected[name])
    batches = site.server.metric(client, "retrain_serve_batch_size_count") - batches_before
    assert batches < len(names), "every image went through the model alone: no dynamic batching happened"


def test_a_batch_of_good_and_bad_files_answers_each_file(site, client: httpx.Client, bomb: bytes) -> None:
    good = (site.photos / "a.jpg").read_bytes()
    files = [
        ("file", ("a.jpg", good, "image/jpeg")),
        ("file", ("notes.txt", b"shopping list", "text/plain")),
        ("file", ("fake.jpg", b"this is not a JPEG at all", "image/jpeg")),
        ("file", ("cut.jpg", good[: len(good) // 2], "image/jpeg")),
        ("file", ("empty.jpg", b"", "image/jpeg")),
        ("file", ("bomb.png", bomb, "image/png")),
        ("file", ("huge.jpg", TOO_BIG, "image/jpeg")),
        ("file", ("c.png", (site.photos / "c.png").read_bytes(), "application/octet-stream")),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    results = {r["filename"]: r for r in body["results"]}
    assert [r["filename"] for r in body["results"]] == [f[1][0] for f in files]
    assert_predict_py_answer(results["a.jpg"], site.expected["a.jpg"])
    assert_predict_py_answer(results["c.png"], site.expected["c.png"])
    assert results["a.jpg"]["model"] == body["model"] == "cats@v001"
    problems = {name: (r["status"], r["error"]) for name, r in results.items() if "error" in r}
    assert problems == {
        "notes.txt": (415, "wrong_content_type"),
        "fake.jpg": (415, "not_an_image"),
        "cut.jpg": (422, "truncated"),
        "empty.jpg": (400, "empty"),
        "bomb.png": (413, "decompression_bomb"),
        "huge.jpg": (413, "too_large"),
    }
    assert "text/plain" in results["notes.txt"]["detail"]
    assert "400000000 pixels" in results["bomb.png"]["detail"]
    assert "serve.max_body_mb" in results["huge.jpg"]["detail"]


def test_bad_requests_get_a_4xx_alone_while_their_neighbours_are_answered(
    site, client: httpx.Client, bomb: bytes
) -> None:
    good = (site.photos / "d.jpg").read_bytes()

    def chunked_too_big() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes as they come
        yield from (TOO_BIG[i : i + 8192] for i in range(0, len(TOO_BIG), 8192))

    jpeg = {"Content-Type": "image/jpeg"}
    requests: dict[str, Any] = {
        "good": lambda: client.post("/predict", content=good, headers=jpeg),
        "not an image": lambda: client.post("/predict", content=b"<html>hello</html>", headers=jpeg),
        "truncated": lambda: client.post("/predict", content=good[:300], headers=jpeg),
        "empty": lambda: client.post("/predict", content=b"", headers=jpeg),
        "bomb": lambda: client.post("/predict", content=bomb, headers={"Content-Type": "image/png"}),
        "too big": lambda: client.post("/predict", content=TOO_BIG, headers=jpeg),
        "too big, chunked": lambda: client.post("/predict", content=chunked_too_big(), headers=jpeg),
        "wrong type": lambda: client.post("/predict", content=good, headers={"Content-Type": "text/plain"}),
        "bad json": lambda: client.post("/predict", content=b"{not json", headers={"Content-Type": "application/json"}),
        "no image field": lambda: client.post("/predict", json={"picture": "abc"}),
        "no file field": lambda: client.post("/predict", files={"photo": ("d.jpg", good, "image/jpeg")}),
    }
    order = [name for name in requests for _ in range(3 if name == "good" else 1)] * 2
    with ThreadPoolExecutor(len(order)) as pool:
        responses = list(pool.map(lambda name: requests[name](), order))
    expected_errors = {
        "not an image": (415, "not_an_image"),
        "truncated": (422, "truncated"),
        "empty": (400, "empty"),
        "bomb": (413, "decompression_bomb"),
        "too big": (413, "too_large"),
        "too big, chunked": (413, "too_large"),
        "wrong type": (415, "wrong_content_type"),
        "bad json": (400, "bad_json"),
        "no image field": (400, "bad_json"),
        "no file field": (400, "no_file"),
    }
    for name, response in zip(order, responses, strict=True):
        if name == "good":
            assert response.status_code == 200, response.text
            assert_predict_py_answer(response.json(), site.expected["d.jpg"])
            continue
        assert (response.status_code, response.json()["error"]) == expected_errors[name], (name, response.text)
        assert response.json()["detail"], name
    assert client.get("/health").status_code == 200  # and it keeps serving


def test_a_wrong_path_or_method_gets_the_same_json_error_shape(client: httpx.Client) -> None:
    wrong_method, wrong_path = client.get("/predict"), client.post("/predictions", content=b"x")
    assert (wrong_method.status_code, wrong_method.json()["error"]) == (405, "method_not_allowed")
    assert (wrong_path.status_code, wrong_path.json()["error"]) == (404, "not_found")
    assert "/predictions" in wrong_path.json()["detail"]


def test_metrics_count_requests_by_status_with_latency_batch_size_and_queue_time(client: httpx.Client) -> None:
    client.put("/predict", content=b"")
    text = client.get("/metrics").text
    assert 'retrain_serve_requests_total{endpoint="/predict",status="400"}' in text
    assert 'retrain_serve_requests_total{endpoint="/health",status="200"}' in text
    for series in (
        'retrain_serve_request_seconds_bucket{endpoint="/predict",le="0.05"}',
        'retrain_serve_batch_size_bucket{le="8.0"}',
        "retrain_serve_queue_seconds_bucket",
        "retrain_serve_inference_seconds_count",
        'retrain_serve_rejected_images_total{kind="empty"}',
        'retrain_serve_model{backend="eager",model="cats@v001"} 1.0',
    ):
        assert series in text, series
