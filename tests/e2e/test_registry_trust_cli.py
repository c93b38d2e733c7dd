"""The registry stays trustworthy around failed runs: a `latest` copied as a folder stops the run before training,
and a run that fails or is stopped with Ctrl-C removes its own reservation (its number is still never reused)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from clitools import FAST, REPO, run_cli

from retrain.artifacts.formats import HOLD_ENV, save_safetensors
from retrain.artifacts.registry import publish, reserve_version
from retrain.utils.io import write_json

pytestmark = pytest.mark.e2e
SHORT = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "test=false", *FAST)


def registry_files(model_dir: Path) -> list[str]:
    """Every entry of the registry of resnet18, hidden ones included."""
    return sorted(p.name for p in (model_dir / "resnet18").iterdir())


def test_a_latest_folder_stops_the_run_before_training_and_a_failed_run_drops_its_reservation(
    tmp_path: Path, imagefolder: Path
) -> None:
    models = tmp_path / "models"
    reservation = reserve_version(models, "resnet18")
    save_safetensors({"fc.bias": torch.zeros(3)}, {"name": "resnet18"}, reservation.staging / "model.safetensors")
    write_json(reservation.staging / "metadata.json", {"name": "resnet18"})
    publish(reservation)
    (models / "resnet18" / "latest").unlink()
    shutil.copytree(models / "resnet18" / "v001", models / "resnet18" / "latest")  # what `cp -aL` leaves

    stopped = run_cli("train.py", f"data.root={imagefolder}", *SHORT, cwd=tmp_path)
    assert stopped.returncode == 1
    assert f"{models / 'resnet18' / 'latest'} is a real folder, not the link" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # refused before training, not after it
    assert registry_files(models) == [".latest.lock", "latest", "v001"]  # nothing reserved, no .latest.tmp

    shutil.rmtree(models / "resnet18" / "latest")  # the fix the message gives
    failed = run_cli(
        "train.py",
        f"data.root={imagefolder}",
        "+callbacks.fail._target_=fault_injection.RaiseOnRank",
        "+callbacks.fail.rank=0",
        f"+callbacks.fail.stamp={tmp_path / 'failed_at'}",
        *SHORT,
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))},
    )
    assert failed.returncode == 1 and "injected failure on rank 0" in failed.output
    assert registry_files(models) == [".high_water", ".latest.lock", "v001"]  # no .v002.partial left behind
    assert (models / "resnet18" / ".high_water").read_text().strip() == "2"  # v002 is never handed out again


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="a FIFO places the Ctrl-C inside a checkpoint write")
def test_ctrl_c_during_training_drops_the_runs_reservation(tmp_path: Path, imagefolder: Path) -> None:
    hold = tmp_path / "hold"
    reached = Path(f"{hold}.reached")
    os.mkfifo(reached)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", HOLD_ENV: str(hold)}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(REPO / "train.py"), f"data.root={imagefolder}", *SHORT]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def interrupt_in_first_write() -> None:
        with open(reached, "rb"):  # returns once training is inside its first checkpoint write
            pass
        reached.unlink()  # later writes create a plain file instead of waiting for a reader
        proc.send_signal(signal.SIGINT)
        hold.touch()  # lets any later write (a checkpoint saved on the way out) finish

    thread = threading.Thread(target=interrupt_in_first_write, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(OSError):  # releases the thread if the run ended before its first write
            os.close(os.open(reached, os.O_WRONLY | os.O_NONBLOCK))
        thread.join()
    assert proc.returncode != 0, (out + err)[-3000:]
    assert hold.exists(), f"the run never reached a checkpoint write\n{(out + err)[-3000:]}"
    assert registry_files(tmp_path / "models") == [".high_water", ".latest.lock"]  # no .v001.partial
