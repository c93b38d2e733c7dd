"""HTTP serving under load: `python serve.py` (dynamic batching) against the naive FastAPI server, in one run.

    python bench/serve.py            # 224 px ResNet18, JPEGs of three sizes, 400 requests per level, soak of 5,000
    python bench/serve.py --quick    # a smoke run: 32 px, 12 requests per level, soak of 100; numbers meaningless

The model is a registry version as `python export.py` leaves it: weights plus an ONNX export. Three servers run
on this machine, each in its own process, on 127.0.0.1 only:
- the naive server (bench/_naive_server.py): an `async def` FastAPI endpoint that decodes the body with PIL and
  calls the eager model on that one image, as a user writes it first;
- retrain serve with its defaults (serve.backend=auto, which times the backends the version offers and keeps the
  fastest; batches of up to 16, 5 ms timeout);
- retrain serve with serve.backend=eager: the same model as the naive server, so its row shows what batching
  and the decode threads alone give.
Every server runs with OMP_WAIT_POLICY=PASSIVE (see SERVER_ENV). The load generator (httpx, asyncio, in this
process) keeps a fixed number of requests in flight (concurrency 1, 8 and 32), each a real JPEG (320x240, 640x480
or 1280x960) as the raw body of POST /predict, until --requests are answered or --max-seconds have passed; at each
level the servers take turns. It reports requests/s and the p50/p95/p99 latency; ratios are to the naive server
(requests/s: higher is better; p99: lower is).

Then the soak, against retrain serve (auto) alone, at concurrency 8: --soak requests, 5 % of them bad (not an
image, a truncated JPEG, an empty body, a wrong content type, a body over serve.max_body_mb), mixed in. Every
good answer is compared with predict.py's code path run here on the same image and the same file the server runs
(label order and probabilities to 1e-4) for the version the response names; every bad request must get its 4xx.
Halfway through, a new version is published and the server (serve.watch=true) swaps to it under load. Resident
memory of the server is read after the first 10 % of the soak (500 of 5,000 requests) and at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from _machine import Row, parse_args, print_report, ratio
from _synthetic import photo

from retrain.artifacts.formats import save_safetensors
from retrain.artifacts.metadata import ArtifactMetadata
from retrain.artifacts.registry import publish, reserve_version, version_dirname
from retrain.data.transforms import preprocessing
from retrain.export.onnx import export_onnx
from retrain.inference.deploy_info import deploy_info, to_props
from retrain.inference.inputs import PredictImages
from retrain.inference.predictions import top_k
from retrain.inference.runtimes import FILE_NAMES
from retrain.model.resnet import build_resnet
from retrain.tasks.predict import load_predictor
from retrain.utils.io import write_json

REPO = Path(__file__).resolve().parents[1]
SIZES = ((320, 240), (640, 480), (1280, 960))
CLASSES = tuple(f"class{i}" for i in range(10))
JPEG = {"Content-Type": "image/jpeg"}
SERVERS = ("naive", "auto", "eager")  # the naive server; retrain serve with auto's pick and with the eager model
ONNX_OPSET = 23  # what conf/export.yaml exports
MAX_BODY_MB = 2
START_TIMEOUT_S = 300
# Every server waits passively between OpenMP regions. On a machine shared with other work, spinning OpenMP
# threads made one process's model calls ten times slower than another's, by chance (the naive server's single
# image: 1,500 ms, the same call in retrain serve: 130 ms; both 130 ms with passive waiting).
SERVER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
PROB_TOLERANCE = 1e-4  # batches of other sizes move float sums in the last digits, never more


@dataclass
class Request:
    """One request of the mix: body, headers, and what a right answer is (an image name, or a 4xx status)."""

    body: bytes
    headers: dict[str, str]
    image: str | None = None
    status: int = 200


@dataclass
class Load:
    """What one load run saw: per request its latency, status and JSON body, and the wall time."""

    latencies: list[float] = field(default_factory=list)
    answers: list[tuple[Request, int, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def per_second(self) -> float:
        """Answered requests per second of wall time."""
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def percentiles_ms(self) -> tuple[float, float, float]:
        """p50, p95 and p99 latency in milliseconds."""
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return 1000 * cuts[49], 1000 * cuts[94], 1000 * cuts[98]


async def run_load(
    url: str,
    mix: list[Request],
    count: int,
    concurrency: int,
    max_s: float,
    after: Callable[[int], None] | None = None,
) -> Load:
    """Send mix[i % len(mix)] for i < count with `concurrency` requests in flight; stop early after max_s."""
    load = Load()
    issued = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + max_s

        async def worker() -> None:
            nonlocal issued
            while issued < count and time.perf_counter() < deadline:
                request = mix[issued % len(mix)]
                issued += 1
                start = time.perf_counter()
                response = await client.post("/predict", content=request.body, headers=request.headers)
                load.latencies.append(time.perf_counter() - start)
                load.answers.append((request, response.status_code, response.json()))
                if after is not None:
                    after(len(load.answers))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        load.wall_s = time.perf_counter() - start
    return load


def publish_version(model_dir: Path, seed: int, image_size: int) -> str:
    """Publish the next version of `bench`: a random ResNet18 for CLASSES with its ONNX export, as export.py
    leaves a version (the export is written before publishing, so a watching server sees both at once)."""
    torch.manual_seed(seed)
    net = build_resnet("resnet18", len(CLASSES)).eval()
    reservation = reserve_version(model_dir, "bench")
    reference = f"bench@{version_dirname(reservation.version)}"
    meta = ArtifactMetadata.from_dict(
        {
            "name": "bench",
            "version": reservation.version,
            "arch": "resnet18",
            "class_names": list(CLASSES),
            "preprocessing": preprocessing(image_size).to_dict(),
        }
    )
    save_safetensors(net.state_dict(), meta.to_dict(), reservation.staging / "model.safetensors")
    size = meta.preprocessing.crop
    onnx = reservation.staging / "exports" / FILE_NAMES["onnx"]
    export_onnx(net, torch.randn(2, 3, size, size), onnx, to_props(deploy_info(meta, reference)), opset=ONNX_OPSET)
    write_json(reservation.staging / "metadata.json", meta.to_dict())
    publish(reservation)
    return reference


def expected_answers(source: str, model_dir: Path, photos: dict[str, Path]) -> dict[str, list[tuple[str, float]]]:
    """predict.py's answers for each photo with `source` (a version, or its export): its loader, dataset, top_k."""
    runtime = load_predictor(source, model_dir=model_dir, allow_pickle=False)
    dataset = PredictImages(list(photos.values()), runtime.info.preprocessing)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return dict(zip(photos, top_k(runtime.predict(images), list(CLASSES), 5), strict=True))


class Expected:
    """predict.py's answers per (version, backend), computed when first needed."""

    def __init__(self, model_dir: Path, photos: dict[str, Path]) -> None:
        self.model_dir, self.photos = model_dir, photos
        self._answers: dict[tuple[str, str], dict[str, list[tuple[str, float]]]] = {}

    def __call__(self, version: str, backend: str) -> dict[str, list[tuple[str, float]]]:
        """Answers of `version` (bench@v001) run by `backend` (eager: the weights; else its exported file)."""
        if (version, backend) not in self._answers:
            folder = self.model_dir / "bench" / version.split("@")[1]
            source = version if backend == "eager" else str(folder / "exports" / FILE_NAMES[backend])
            self._answers[version, backend] = expected_answers(source, self.model_dir, self.photos)
        return self._answers[version, backend]


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running(args: list[str], cwd: Path, url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server process, once GET /health answers 200; stopped (SIGTERM) on leaving, also when it failed to start."""
    log = cwd / f"{Path(args[0]).stem}-{url.rsplit(':', 1)[1]}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=SERVER_ENV, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            try:
                process.wait(timeout=0.25)  # the pause between polls; returns at once if the server died
            except subprocess.TimeoutExpired:
                if time.monotonic() < deadline:
                    continue
            raise SystemExit(f"{' '.join(args)} did not start:\n{log.read_text()[-3000:]}")
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def rss_mib(pid: int) -> float:
    """Resident memory of a process, in MiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_requests(jpeg: bytes) -> list[Request]:
    """One of each bad upload the soak mixes in, with the status it must get."""
    return [
        Request(b"<html>not a photo</html>", JPEG, status=415),
        Request(jpeg[: len(jpeg) // 3], JPEG, status=422),
        Request(b"", JPEG, status=400),
        Request(jpeg, {"Content-Type": "text/plain"}, status=415),
        Request(os.urandom(MAX_BODY_MB * 2**20 + 1), JPEG, status=413),
    ]


def check(load: Load, expected: Callable[[str], dict[str, list[tuple[str, float]]]]) -> tuple[int, int]:
    """(wrong answers, 5xx): a good image must get predict.py's answer of the version it names, a bad one its 4xx."""
    wrong = errors = 0
    for request, status, body in load.answers:
        errors += status >= 500
        if status != request.status:
            wrong += 1
        elif request.image is not None:
            want = expected(body["model"])[request.image]
            got = [(p["label"], p["p"]) for p in body["probabilities"]]
            same = [label for label, _ in got] == [label for label, _ in want]
            wrong += not (same and all(abs(p - q) <= PROB_TOLERANCE for (_, p), (_, q) in zip(got, want, strict=True)))
    return wrong, errors


def backend_of(url: str) -> dict[str, Any]:
    """The backend a retrain server says it runs (kind, reason, timings)."""
    return dict(httpx.get(f"{url}/info").json()["backend"])


def main() -> None:
    """Start the servers, load them in turns at each concurrency, then soak retrain's server; print the table."""

    def extra(parser):
        parser.add_argument("--requests", type=int, default=400, help="requests per server and concurrency level")
        parser.add_argument("--soak", type=int, default=5000, help="requests of the soak (5 %% of them bad)")
        parser.add_argument("--max-seconds", type=float, default=300, help="time bound of each load run")
        parser.add_argument("--image-size", type=int, default=224, help="the model's input size")

    args = parse_args(__doc__, extra)
    if args.quick:
        args.requests, args.soak, args.image_size, args.max_seconds = 12, 100, 32, 120
    levels = (1, 8, 32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = root / "models"
        publish_version(models, seed=0, image_size=args.image_size)
        photos: dict[str, Path] = {}
        for i, (w, h) in enumerate(SIZES * 2):
            path = root / "photos" / f"{w}x{h}-{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(w, h, seed=i).save(path, "JPEG", quality=90)
            photos[path.name] = path
        expected = Expected(models, photos)
        good = [Request(path.read_bytes(), JPEG, image=name) for name, path in photos.items()]

        urls = {name: f"http://127.0.0.1:{free_port()}" for name in SERVERS}
        common = [f"serve.max_body_mb={MAX_BODY_MB}", f"paths.root_dir={root}"]

        def ours(name: str, *overrides: str) -> list[str]:
            port = urls[name].rsplit(":", 1)[1]
            return [str(REPO / "serve.py"), "ckpt_path=bench@latest", f"serve.port={port}", *common, *overrides]

        naive_port = urls["naive"].rsplit(":", 1)[1]
        naive = [str(REPO / "bench" / "_naive_server.py"), "--source", "bench@latest", "--model-dir", str(models)]
        with (
            running(ours("auto", "serve.watch=true", "serve.watch_interval_s=1"), root, urls["auto"]) as server,
            running(ours("eager", "serve.backend=eager"), root, urls["eager"]),
            running([*naive, "--port", naive_port], root, urls["naive"]),
        ):
            backend = backend_of(urls["auto"])
            runs: dict[tuple[str, int], Load] = {}
            for turn, concurrency in enumerate(levels):
                for name in SERVERS[turn:] + SERVERS[:turn]:  # each level starts with another server
                    asyncio.run(run_load(urls[name], good, 2 * concurrency, concurrency, args.max_seconds))  # warm-up
                    runs[name, concurrency] = asyncio.run(
                        run_load(urls[name], good, args.requests, concurrency, args.max_seconds)
                    )
            wrong_timed = sum(
                check(runs[name, c], lambda version, kind=kind: expected(version, kind))[0]
                for name, kind in (("auto", backend["kind"]), ("eager", "eager"))
                for c in levels
            )

            # The soak: every 20th request bad, a new version published halfway, memory read after 10 %.
            bad = bad_requests(good[0].body)
            mix = [bad[(i // 20) % len(bad)] if i % 20 == 19 else good[i % len(good)] for i in range(20 * len(bad))]
            memory: dict[str, float] = {}

            def after(done: int) -> None:
                if done == max(1, args.soak // 10):
                    memory["first"] = rss_mib(server.pid)
                if done == args.soak // 2:
                    asyncio.get_running_loop().run_in_executor(None, publish_version, models, 1, args.image_size)

            soak = asyncio.run(run_load(urls["auto"], mix, args.soak, 8, 10 * args.max_seconds, after))
            memory["end"] = rss_mib(server.pid)
            kinds = {"bench@v001": backend["kind"], "bench@v002": backend_of(urls["auto"])["kind"]}
            wrong_soak, errors_soak = check(soak, lambda version: expected(version, kinds[version]))
            answered_by = sorted({body["model"] for _, status, body in soak.answers if status == 200})

    rows: list[Row] = []
    labels = {
        "naive": "naive server (eager, one image per request)",
        "auto": f"retrain serve (auto: {backend['kind']})",
        "eager": "retrain serve (serve.backend=eager)",
    }
    for concurrency in levels:
        base = runs["naive", concurrency]
        for name in SERVERS:
            run = runs[name, concurrency]
            rows.append(
                Row(
                    f"{labels[name]}, concurrency {concurrency}: requests/s",
                    run.per_second,
                    "req/s",
                    ratio(run.per_second, base.per_second),
                )
            )
        b99 = base.percentiles_ms()[2]
        for name in SERVERS:
            p50, p95, p99 = runs[name, concurrency].percentiles_ms()
            rows.append(
                Row(
                    f"{labels[name]}, concurrency {concurrency}: p50 / p95 / p99",
                    f"{p50:.0f} / {p95:.0f} / {p99:.0f} ms",
                    ratio=ratio(p99, b99),
                    note="ratio of p99: lower is better",
                )
            )
    growth = 100 * (memory["end"] - memory["first"]) / memory["first"]
    n_bad = sum(request.image is None for request, _, _ in soak.answers)
    rows += [
        Row("soak: requests (bad ones mixed in)", f"{len(soak.answers):,} ({n_bad} bad)"),
        Row("soak: requests/s at concurrency 8", soak.per_second, "req/s"),
        Row("soak: wrong answers / 5xx", f"{wrong_soak} / {errors_soak}"),
        Row(
            f"soak: resident memory after the first {args.soak // 10} requests -> at the end",
            f"{memory['first']:.0f} -> {memory['end']:.0f} MiB ({growth:+.1f} %)",
        ),
        Row("soak: hot swap to a version published halfway", f"answered by {', '.join(answered_by)}"),
    ]
    c32 = ratio(runs["auto", 32].per_second, runs["naive", 32].per_second) or 0.0
    p99_8 = ratio(runs["auto", 8].percentiles_ms()[2], runs["naive", 8].percentiles_ms()[2]) or float("inf")
    timings = ", ".join(f"{kind} {ms:.2f}" for kind, ms in backend["ms_per_image"].items())
    print_report(
        f"Serving: resnet18, {args.image_size} px, JPEGs {', '.join(f'{w}x{h}' for w, h in SIZES)}, loopback",
        rows,
        notes=[
            f"serve.backend=auto picked {backend['kind']} (measured at start-up, ms/image: {timings or 'n/a'}). "
            f"Batches of up to 16, 5 ms timeout. {args.requests} timed requests per server and level after a "
            "warm-up; ratios are to the naive server measured in the same run.",
            f"Targets: concurrency 32 requests/s >= 2x naive: {c32:.2f}x ({'met' if c32 >= 2 else 'missed'}); "
            f"p99 at concurrency 8 no worse than naive: {p99_8:.2f}x ({'met' if p99_8 <= 1 else 'missed'}); "
            f"soak: {wrong_soak} wrong answers, {errors_soak} 5xx, memory {growth:+.1f} % "
            f"({'met' if wrong_soak == errors_soak == 0 and growth < 5 else 'missed'}); wrong answers in the timed "
            f"runs: {wrong_timed}.",
        ],
    )


if __name__ == "__main__":
    main()
