"""A server following cats@latest: hot swaps under load, a broken version that is refused, and SIGTERM.

One server answers the module; the SIGTERM test stops it and therefore runs last.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

pytestmark = pytest.mark.e2e

CLASSES = ("cat", "dog", "fox")
NEW_CLASSES = ("ant", "bee", "cow", "doe")
GRACE_S = 5
JPEG = {"Content-Type": "image/jpeg"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, make_version, make_photo, start_server) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("watch")
    make_version(root / "models", seed=0, classes=CLASSES)
    server = start_server(
        root, "ckpt_path=cats@latest", "serve.watch=true", "serve.watch_interval_s=0.2", f"serve.grace_s={GRACE_S}"
    )
    return SimpleNamespace(server=server, models=root / "models", photo=make_photo(7, (48, 48)))


@pytest.fixture
def client(lab) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=lab.server.url, timeout=120) as c:
        yield c


def wait_until(condition, what: str, stop: threading.Event | None = None, timeout_s: float = 180) -> None:
    """Poll `condition` until true; fail saying `what` did not happen."""
    pause = stop or threading.Event()
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        pause.wait(0.05)
    raise AssertionError(f"{what} did not happen within {timeout_s} s")


def test_a_new_version_is_served_under_load_and_no_request_fails(lab, client: httpx.Client, make_version) -> None:
    old = client.get("/info").json()["model"]
    answers: list[list[tuple[int, str, str]]] = [[] for _ in range(4)]
    stop = threading.Event()

    def hammer(mine: list[tuple[int, str, str]]) -> None:
        with httpx.Client(base_url=lab.server.url, timeout=120) as c:
            while not stop.is_set() and len(mine) < 5000:
                response = c.post("/predict", content=lab.photo, headers=JPEG)
                body = response.json()
                mine.append((response.status_code, body.get("model", ""), body.get("label", "")))

    with ThreadPoolExecutor(len(answers)) as pool:
        running = [pool.submit(hammer, mine) for mine in answers]
        wait_until(lambda: all(len(mine) >= 3 for mine in answers), "answers from the old version", stop)
        folder = make_version(lab.models, seed=1, classes=NEW_CLASSES, image_size=40)
        new = f"cats@{folder.name}"
        wait_until(lambda: client.get("/info").json()["model"] == new, f"the swap to {new}", stop)
        count = sum(map(len, answers))
        wait_until(lambda: sum(map(len, answers)) >= count + 12, "answers from the new version", stop)
        stop.set()
        for future in running:
            future.result()
    flat = [answer for mine in answers for answer in mine]
    assert {status for status, _, _ in flat} == {200}
    assert {model for _, model, _ in flat} == {old, new}
    classes = {old: CLASSES, new: NEW_CLASSES}
    assert all(label in classes[model] for _, model, label in flat)  # each answer from the version it names
    for mine in answers:  # once a client got the new version, it never went back
        models = [model for _, model, _ in mine]
        assert models == sorted(models, key=[old, new].index)
    info = client.get("/info").json()
    assert info["class_names"] == list(NEW_CLASSES) and info["preprocessing"]["crop"] == 40
    assert "kept from the version before" in info["backend"]["reason"]  # no timing of backends under load
    assert lab.server.metric(client, 'retrain_serve_model_swaps_total{outcome="ok"}') >= 1


def test_a_version_that_fails_to_load_is_logged_and_the_old_one_keeps_serving(
    lab, client: httpx.Client, make_version
) -> None:
    current = client.get("/info").json()["model"]
    failed = 'retrain_serve_model_swaps_total{outcome="failed"}'
    before = lab.server.metric(client, failed)
    broken = make_version(lab.models, seed=2, classes=CLASSES, fits=False)  # weights for 5 classes, metadata 3
    wait_until(lambda: lab.server.metric(client, failed) > before, "the failed swap")
    response = client.post("/predict", content=lab.photo, headers=JPEG)
    assert response.status_code == 200 and response.json()["model"] == current
    assert client.get("/info").json()["model"] == current
    assert f"{broken} failed to load, still serving {current}" in lab.server.output()


def test_sigterm_stops_accepting_answers_requests_in_flight_and_exits_0(lab, client: httpx.Client) -> None:
    started = [threading.Event(), threading.Event()]
    release, server_gone = threading.Event(), threading.Event()

    def slow_upload(index: int, finish: bool) -> Iterator[bytes]:
        yield lab.photo[:100]
        started[index].set()
        if finish:  # the other one never finishes its upload: the server gives up on it after grace_s
            release.wait(120)
            yield lab.photo[100:]
        else:
            server_gone.wait(GRACE_S + 120)

    def send(index: int, finish: bool) -> httpx.Response | Exception:
        try:
            return httpx.post(
                f"{lab.server.url}/predict", content=slow_upload(index, finish), headers=JPEG, timeout=GRACE_S + 120
            )
        except httpx.HTTPError as e:
            return e

    with ThreadPoolExecutor(2) as pool:
        finished, abandoned = pool.submit(send, 0, True), pool.submit(send, 1, False)
        assert all(event.wait(120) for event in started)
        # Both uploads are being handled (the /metrics request itself is the third).
        wait_until(lambda: lab.server.metric(client, "retrain_serve_requests_in_progress") >= 3, "both uploads")
        lab.server.process.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                httpx.get(f"{lab.server.url}/health", timeout=5)
            except httpx.ConnectError:
                return True
            return False

        wait_until(refused, "closing the listening socket")
        assert lab.server.process.poll() is None  # still finishing what is in flight
        release.set()
        response = finished.result()
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        assert response.json()["label"] in CLASSES + NEW_CLASSES
        assert lab.server.process.wait(timeout=GRACE_S + 60) == 0
        server_gone.set()
        given_up = abandoned.result()  # after grace_s the server stops waiting for this upload: a 500, or cut off
        assert not isinstance(given_up, httpx.Response) or given_up.status_code == 500, given_up
    before, gave_up, after = lab.server.output().partition(
        "Cancel 1 running task(s), timeout graceful shutdown exceeded"
    )
    assert gave_up and "Shutting down" in before and "Traceback" not in before  # uvicorn logs the cut-off one
    assert "stopped; the last version served was" in after
