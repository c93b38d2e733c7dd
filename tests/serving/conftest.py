"""Fixtures for the serving tests: a registry with real (random) ResNet18 versions, photos, and the real server.

The server runs as a user starts it, `python serve.py ckpt_path=... serve.port=...`, on a free loopback port.
Start-up (imports, load, warm-up) takes seconds, so each test module starts one server and shares it.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from clitools import REPO
from PIL import Image

from retrain.artifacts.formats import save_safetensors
from retrain.artifacts.registry import publish, reserve_version
from retrain.data.transforms import preprocessing
from retrain.model.resnet import build_resnet
from retrain.utils.io import write_json

START_TIMEOUT_S = 240  # imports and warm-up on a busy 2-core machine


def publish_model(
    model_dir: Path, *, seed: int, classes: tuple[str, ...], image_size: int = 32, fits: bool = True
) -> Path:
    """Publish the next version of `cats`: a random ResNet18 for `classes`; fits=False gives weights for 2 more."""
    torch.manual_seed(seed)
    net = build_resnet("resnet18", len(classes) + (0 if fits else 2))
    reservation = reserve_version(model_dir, "cats")
    meta = {
        "schema": 1,
        "name": "cats",
        "version": reservation.version,
        "created": "2025-01-02T03:04:05+00:00",
        "arch": "resnet18",
        "num_classes": len(classes),
        "class_names": list(classes),
        "preprocessing": preprocessing(image_size).to_dict(),
        "metrics": {},
        "parent": None,
    }
    save_safetensors(net.state_dict(), meta, reservation.staging / "model.safetensors")
    write_json(reservation.staging / "metadata.json", meta)
    return publish(reservation)


def photo_bytes(seed: int, size: tuple[int, int], fmt: str = "JPEG") -> bytes:
    """A small noisy photo, encoded."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid PNG header announcing width x height pixels (over Pillow's limit) in a few dozen bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A running `python serve.py`: its process, URL and log file."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        """What the server printed so far."""
        return self.log.read_text(errors="replace")

    def metric(self, client: httpx.Client, name: str) -> float:
        """The sum of every sample of one /metrics series (0 when absent)."""
        text = client.get(f"{self.url}/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith((name + " ", name + "{"))
        )

    def stop(self) -> int:
        """SIGTERM, then the exit status (killed after a minute if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., Server]]:
    """Start `python serve.py OVERRIDES` in a folder (its models/ is the registry) and wait until /health is 200."""
    started: list[Server] = []

    def start(cwd: Path, *overrides: str) -> Server:
        port = free_port()
        log = cwd / f"serve-{port}.log"
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("RETRAIN_MODEL_DIR", None)
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(REPO / "serve.py"), f"serve.port={port}", *overrides],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        server = Server(process, f"http://127.0.0.1:{port}", log)
        started.append(server)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{server.url}/health", timeout=5).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            try:  # the pause between polls, which also notices a server that exited
                process.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                continue
            break
        raise AssertionError(f"serve.py did not become healthy (exit {process.poll()}):\n{server.output()[-4000:]}")

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def make_version() -> Callable[..., Path]:
    """publish_model, for module-scoped registries (conftest's publish_version is per test)."""
    return publish_model


@pytest.fixture(scope="session")
def make_photo() -> Callable[..., bytes]:
    """photo_bytes: a small encoded noisy photo."""
    return photo_bytes


@pytest.fixture(scope="session")
def bomb() -> bytes:
    """bomb_png(): a 20000x20000 PNG header."""
    return bomb_png()
