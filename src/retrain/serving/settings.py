"""The `serve.*` config as one typed, checked object, so a wrong value fails at start-up, not under load."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from retrain.errors import ConfigError

BACKENDS = ("auto", "eager", "onnx", "torchscript", "export", "int8")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class ServeSettings:
    """What the server does with requests: where it listens, how it batches, what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8000
    backend: str = "auto"
    device: str = "auto"
    max_batch_size: int = 16
    batch_timeout_ms: float = 5.0
    max_body_mb: float = 10.0
    max_files: int = 64
    top_k: int = 5
    decode_threads: int | None = None
    watch: bool = False
    watch_interval_s: float = 2.0
    grace_s: float = 10.0
    access_log: bool = False

    @property
    def max_body_bytes(self) -> int:
        """The largest image body (or multipart file) accepted, in bytes."""
        return int(self.max_body_mb * 2**20)

    @classmethod
    def from_config(cls, serve: Any) -> ServeSettings:
        """Read `cfg.serve` (any mapping); every out-of-range value is a ConfigError naming the key and the fix."""
        values = {key: serve[key] for key in cls.__dataclass_fields__ if key in serve}
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values the server cannot run with, before it loads anything."""
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"serve.backend={self.backend!r} is unknown; expected one of {list(BACKENDS)}. "
                "Fix: serve.backend=auto picks the fastest one the model offers."
            )
        if self.device not in DEVICES:
            raise ConfigError(f"serve.device={self.device!r} is unknown; expected one of {list(DEVICES)}.")
        positive = {
            "max_batch_size": self.max_batch_size,
            "max_body_mb": self.max_body_mb,
            "max_files": self.max_files,
            "top_k": self.top_k,
            "watch_interval_s": self.watch_interval_s,
            "grace_s": self.grace_s,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"serve.{key}={value}; expected a value above 0. Fix: see conf/serve.yaml.")
        if self.batch_timeout_ms < 0:
            raise ConfigError(
                f"serve.batch_timeout_ms={self.batch_timeout_ms}; expected 0 or more milliseconds (0: no waiting "
                "for more requests). Fix: e.g. serve.batch_timeout_ms=5."
            )
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ConfigError(
                f"serve.decode_threads={self.decode_threads}; expected 1 or more, or null (one per core)."
            )
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"serve.port={self.port} is not a TCP port; expected 1-65535. Fix: e.g. serve.port=8000.")
        if self.host != "localhost":
            try:
                ipaddress.ip_address(self.host)
            except ValueError:
                raise ConfigError(
                    f"serve.host={self.host!r} is not an IP address. Expected 127.0.0.1 (this machine only, the "
                    "default) or 0.0.0.0 (every network interface). Fix: serve.host=0.0.0.0 to accept other machines."
                ) from None

    @property
    def public(self) -> bool:
        """Whether other machines can reach the server (anything but a loopback address)."""
        return self.host != "localhost" and not ipaddress.ip_address(self.host).is_loopback
