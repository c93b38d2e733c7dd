"""Interrupted runs lose nothing: SIGKILL inside an epoch and inside a checkpoint write, SIGTERM in fit and in the
post-fit test, then resume.

Every interruption lands at a known point without sleeps or timing. One training image and one test image are
FIFOs that the test serves: the trainer blocks in open() until the test answers, so the test acts while training
is inside a given epoch, or while the test on the best checkpoint is inside its first batch.
RETRAIN_TEST_HOLD_WRITE pauses a checkpoint write after its temp file is complete and before os.replace, and
tells the test so through another FIFO.

One chain of five runs of one model name in one folder; each `ckpt_path=last` goes on in run 1's run folder:
1. a fresh run, SIGKILLed while reading epoch 1's images (epoch 0's checkpoints exist);
2. `ckpt_path=last`, SIGKILLed inside its first checkpoint write;
3. `ckpt_path=last` again (run 1's last.ckpt: run 2 left none), SIGTERMed inside epoch 1;
4. `ckpt_path=last` (run 3's last.ckpt), which finishes that epoch and fit, then is SIGTERMed in its test;
5. `ckpt_path=last` (run 4's last.ckpt, fit finished), which goes straight to test and publishes.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import FAST, REPO, CliResult, make_imagefolder
from PIL import Image

from retrain.artifacts.formats import HOLD_ENV, read_artifact, save_safetensors
from retrain.artifacts.registry import list_versions, publish, reserve_version
from retrain.utils.io import write_json

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs place the interruptions"),
]

NAME = "kills"
EPOCHS = 3
BATCHES = 3  # 24 train images (23 files and the served one) in batches of 8
TIMEOUT = 300
OVERRIDES = (
    f"name={NAME}",
    f"trainer.max_epochs={EPOCHS}",
    "data.validate=off",  # the scan would open the FIFO, and call it a 0-byte file
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "model.freeze=true",  # checkpoints of 45 MB instead of 90 (no momentum for the backbone)
    "model.feature_cache=false",  # every epoch must read the served image
    "model.bn_stats=frozen",  # adapting would read the served image before epoch 0
    "~callbacks.report",
    *FAST,
)
OnOpen = Callable[[int, subprocess.Popen], bool]


class ServedImage:
    """A training image that is a FIFO: when the trainer opens it, the test's `on_open` runs, then the bytes follow."""

    def __init__(self, path: Path) -> None:
        buffer = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), (200, 40, 40), np.uint8)).save(buffer, "PNG")
        self.path = path
        self.data = buffer.getvalue()
        self._renew()

    def _renew(self) -> None:
        # A new FIFO for the next read, so the next open() waits for the test even while the trainer still
        # holds this one.
        fresh = self.path.with_name(".next.fifo")
        os.mkfifo(fresh)
        os.replace(fresh, self.path)

    @contextlib.contextmanager
    def serving(self, proc: subprocess.Popen, on_open: OnOpen) -> Iterator[None]:
        """Answer each read; `on_open(n, proc)` may signal the trainer, and returns False to stop answering."""
        stop = threading.Event()

        def serve() -> None:
            n = 0
            while True:
                with open(self.path, "wb") as f:  # returns when the trainer opens the image
                    if stop.is_set():
                        return
                    self._renew()
                    if not on_open(n, proc):
                        return
                    with contextlib.suppress(BrokenPipeError):
                        f.write(self.data)
                n += 1

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            unblock = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)  # releases serve() waiting in open()
            thread.join()
            os.close(unblock)


@contextlib.contextmanager
def killed_in_first_write(proc: subprocess.Popen, hold: Path, logs: Path) -> Iterator[list[Path]]:
    """SIGKILL `proc` while its first atomic write waits between its complete temp file and os.replace.

    Yields the list of files in the written file's folder at that moment (filled once the kill happened).
    """
    reached = Path(f"{hold}.reached")
    os.mkfifo(reached)
    seen: list[Path] = []

    def wait_and_kill() -> None:
        with open(reached, "rb"):  # returns once the writer opens it: its temp file is complete
            pass
        if proc.poll() is None:
            seen.extend(sorted(p for temp in logs.rglob(".*.tmp") for p in temp.parent.iterdir()))
            proc.kill()

    thread = threading.Thread(target=wait_and_kill, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        with contextlib.suppress(OSError):  # ENXIO when nobody waits in open(); otherwise it releases the thread
            os.close(os.open(reached, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()


def run_train(
    cwd: Path, served: Sequence[tuple[ServedImage, OnOpen]], *overrides: str, hold: Path | None = None
) -> tuple[CliResult, list[Path]]:
    """Run train.py in `cwd` while serving the images; with `hold`, kill it inside its first checkpoint write."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HYDRA_FULL_ERROR", None)
    if hold is not None:
        env[HOLD_ENV] = str(hold)
    command = [sys.executable, str(REPO / "train.py"), *OVERRIDES, *overrides]
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = killed_in_first_write(proc, hold, cwd / "logs") if hold else contextlib.nullcontext([])
    with contextlib.ExitStack() as serving, held as seen:
        for image, on_open in served:
            serving.enter_context(image.serving(proc, on_open))
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"train.py did not finish in {TIMEOUT} s\n{(out + err)[-4000:]}")
    return CliResult(proc.returncode, out, err, cwd), seen


def serve_then_kill_at(read: int) -> OnOpen:
    """Serve the image until its `read`-th read (0-based, one per epoch), then SIGKILL the trainer."""

    def on_open(n: int, proc: subprocess.Popen) -> bool:
        if n < read:
            return True
        proc.kill()
        return False

    return on_open


def serve_and_term_at(read: int) -> OnOpen:
    """Serve the image; at its `read`-th read send SIGTERM first, so the signal lands inside that read's batch."""

    def on_open(n: int, proc: subprocess.Popen) -> bool:
        if n == read:
            proc.send_signal(signal.SIGTERM)
        return True

    return on_open


def always(n: int, proc: subprocess.Popen) -> bool:
    """Serve every read."""
    return True


def unloadable_checkpoints(logs: Path) -> dict[str, str]:
    """Each *.ckpt under `logs` that does not load as a resumable Lightning checkpoint, with the reason."""
    problems = {}
    for path in sorted(logs.rglob("*.ckpt")):
        try:
            checkpoint = read_artifact(path).checkpoint or {}
        except Exception as error:  # report every bad file, not just the first
            problems[str(path)] = repr(error)
            continue
        missing = {"loops", "optimizer_states", "retrain"} - set(checkpoint)
        if missing:
            problems[str(path)] = f"no {sorted(missing)}"
    return problems


def registry_state(model_dir: Path) -> dict:
    """What a user of the registry sees: the published versions, `latest`, and the bytes of v001."""
    root = model_dir / NAME
    return {
        "versions": [row["version"] for row in list_versions(model_dir, NAME)],
        "latest": os.readlink(root / "latest"),
        "v001": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "v001").iterdir())},
    }


def publish_first_version(model_dir: Path) -> None:
    """v001 of NAME, as an earlier run would have left it, so each kill can be checked against it."""
    reservation = reserve_version(model_dir, NAME)
    state = {"fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}
    save_safetensors(state, {"name": NAME, "version": 1}, reservation.staging / "model.safetensors")
    write_json(reservation.staging / "metadata.json", {"name": NAME, "version": 1, "metrics": {}})
    publish(reservation)


@dataclass
class Stage:
    """One run of the chain and what it left behind."""

    result: CliResult
    seen_in_write: list[Path]
    unloadable: dict[str, str]
    registry: dict
    staging: list[str]  # the hidden .vNNN.partial folders of reservations left behind
    run_dir: Path = field(init=False)  # where it wrote: run 1's folder for every `ckpt_path=last`
    # Right after it (later runs go on in the same folder): its checkpoints (name: mtime), results.json, and
    # last.ckpt's epoch, step and parent.
    checkpoints: dict[str, int] = field(init=False)
    results: dict | None = field(init=False)
    last: dict | None = field(init=False)

    def __post_init__(self) -> None:
        session = self.result.runs()[-1]
        continued = session / "continued_in.txt"
        self.run_dir = Path(continued.read_text().strip()) if continued.is_file() else session
        self.checkpoints = {p.name: p.stat().st_mtime_ns for p in (self.run_dir / "checkpoints").glob("*.ckpt")}
        results, last = self.run_dir / "results.json", self.run_dir / "checkpoints" / "last.ckpt"
        self.results = json.loads(results.read_text()) if results.is_file() else None
        self.last = None
        if last.is_file():
            checkpoint = torch.load(last, map_location="cpu", weights_only=True)
            self.last = {k: checkpoint[k] for k in ("epoch", "global_step")} | {"retrain": checkpoint["retrain"]}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Stage | dict]:
    """Run the four interrupted and resumed runs in one folder, recording the state after each."""
    data = make_imagefolder(tmp_path_factory.mktemp("killdata") / "images")
    (data / "train" / "cat" / "001.jpg").unlink()  # 24 images with the served one: no batch of 1 for BatchNorm
    image = ServedImage(data / "train" / "cat" / "zz_served.png")
    # 13 test images in batches of 8: the served one is read in the first batch, and a second batch follows.
    test_image = ServedImage(data / "test" / "cat" / "zz_served.png")
    cwd = tmp_path_factory.mktemp("killwork")
    publish_first_version(cwd / "models")
    stages: dict[str, Stage | dict] = {"before": registry_state(cwd / "models")}

    def stage(key: str, on_open: OnOpen, *overrides: str, hold: Path | None = None, on_test: OnOpen = always) -> None:
        served = [(image, on_open), (test_image, on_test)]
        result, seen = run_train(cwd, served, f"data.root={data}", *overrides, hold=hold)
        staging = sorted(p.name for p in (cwd / "models" / NAME).glob(".*.partial"))
        stages[key] = Stage(result, seen, unloadable_checkpoints(cwd / "logs"), registry_state(cwd / "models"), staging)

    stage("epoch", serve_then_kill_at(read=1))
    stage("write", always, "ckpt_path=last", hold=cwd / "hold")
    stage("sigterm", serve_and_term_at(read=0), "ckpt_path=last")
    stage("test", always, "ckpt_path=last", on_test=serve_and_term_at(read=0))
    stage("resume", always, "ckpt_path=last")
    return stages


def test_sigkill_inside_an_epoch_keeps_every_checkpoint_loadable(chain) -> None:
    killed = chain["epoch"]
    assert killed.result.returncode == -signal.SIGKILL, killed.result.output[-3000:]
    assert "last.ckpt" in killed.checkpoints
    assert len(fnmatch.filter(killed.checkpoints, f"{NAME}-v002-*-epoch000-*.ckpt")) == 1  # epoch 0 done, 1 not
    assert killed.last is not None and killed.last["epoch"] == 0
    assert killed.unloadable == {}
    assert killed.registry == chain["before"]


def test_sigkill_inside_a_checkpoint_write_leaves_no_partial_file(chain) -> None:
    killed = chain["write"]
    assert killed.result.returncode == -signal.SIGKILL, killed.result.output[-3000:]
    # Paused inside its first write: the complete temp file under a hidden name, nothing under a real one.
    temps = [p for p in killed.seen_in_write if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].name.startswith(f".{NAME}-v003-") and temps[0].name.endswith(".tmp"), temps
    assert temps[0].parent == killed.run_dir / "checkpoints" == chain["epoch"].run_dir / "checkpoints"
    assert killed.checkpoints == chain["epoch"].checkpoints  # run 1's files, untouched; nothing of run 2's
    assert killed.unloadable == {}
    assert killed.registry == chain["before"]


def stopped_on_sigterm(chain: dict, key: str, phase: str) -> dict:
    """Check stage `key` stopped on SIGTERM in `phase` as a user should see it; return its results.json.

    Exit 143, one log line with the command that finishes the run, results.json naming the phase and last.ckpt,
    nothing published, and the version it had reserved dropped.
    """
    stopped = chain[key]
    output = stopped.result.output
    assert stopped.result.returncode == 143, output[-3000:]
    assert f"Stopped on SIGTERM in {phase}" in output
    assert "Traceback" not in output
    results = stopped.results
    assert results is not None
    assert results["status"] == "preempted" and results["phase"] == phase
    assert Path(results["checkpoint"]) == stopped.run_dir / "checkpoints" / "last.ckpt"
    assert results["resume_command"].endswith(f"name={NAME} ckpt_path=last") and results["resume_command"] in output
    assert stopped.unloadable == {}
    assert stopped.registry == chain["before"]
    assert stopped.staging == chain["write"].staging  # runs 1 and 2 were SIGKILLed and left theirs for `gc`
    return results


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(chain) -> None:
    stopped_on_sigterm(chain, "sigterm", "fit")
    checkpoint = chain["sigterm"].last
    assert checkpoint["epoch"] == 1 and BATCHES < checkpoint["global_step"] <= 2 * BATCHES  # inside epoch 1
    # ckpt_path=last skipped run 2 (it saved nothing) and resumed run 1's last.ckpt.
    parent = checkpoint["retrain"]["parent"]
    assert parent["how"] == "resumed"
    assert Path(parent["path"]) == (chain["epoch"].run_dir / "checkpoints" / "last.ckpt").resolve()


def test_sigterm_in_the_test_after_fit_stops_with_143_and_says_how_to_finish(chain) -> None:
    # Lightning's test loop raises SIGTERMException, a SystemExit without a code: unhandled, that was exit 0.
    stopped_on_sigterm(chain, "test", "test")
    # Fit had finished: the preempted epoch of run 3 was completed, not repeated.
    assert chain["test"].last["global_step"] == EPOCHS * BATCHES


def test_ckpt_path_last_after_the_interruptions_finishes_and_publishes(chain) -> None:
    resumed = chain["resume"]
    assert resumed.result.returncode == 0, resumed.result.output[-3000:]
    results = json.loads((resumed.run_dir / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["global_step"] == EPOCHS * BATCHES
    assert [row["epoch"] for row in results["history"]] == list(range(EPOCHS))
    assert results["test"]["test/acc"] >= 0
    parent = results["metadata"]["parent"]
    assert Path(parent["path"]) == (chain["test"].run_dir / "checkpoints" / "last.ckpt").resolve()
    assert resumed.checkpoints == chain["test"].checkpoints  # fit was finished: straight to test and publish
    assert resumed.unloadable == {}
    before, after = chain["before"], resumed.registry
    assert after["v001"] == before["v001"]
    new = after["versions"][-1]
    assert after["versions"] == [1, new] and new > 1
    assert after["latest"] == f"v{new:03d}"
