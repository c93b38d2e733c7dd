"""A failing DDP rank stops the whole run: every rank exits within 60 s, with that rank's error shown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clitools import FAST, REPO

from retrain.artifacts.registry import list_versions

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")]

DEADLINE_S = 60  # from the failure to the last rank gone
STARTUP_S = 240  # two processes importing Lightning on a busy 2-core machine


def live_members(pgid: int) -> list[int]:
    """The processes of a group that still run; zombies do not count (this container's init never reaps them)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, ...
        except OSError:  # the process ended while we looked
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_an_error_on_rank_1_ends_every_rank_with_that_error_shown(tmp_path: Path, imagefolder: Path) -> None:
    stamp = tmp_path / "failed_at"
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [
        sys.executable,
        str(REPO / "train.py"),
        "trainer=ddp_cpu",
        f"data.root={imagefolder}",
        "trainer.max_epochs=2",
        "model.freeze=true",
        "+callbacks.fail._target_=fault_injection.RaiseOnRank",
        "+callbacks.fail.rank=1",
        f"+callbacks.fail.stamp={stamp}",
        *FAST,
    ]
    # A session of its own: the test can tell whether any rank survives, and clean up if one does.
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=STARTUP_S + DEADLINE_S)
        ended = time.time()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run hung after rank 1 failed\n{(out + err)[-4000:]}")
    finally:
        survivors = live_members(proc.pid)
        if survivors:
            os.killpg(proc.pid, signal.SIGKILL)
    output = out + err
    assert stamp.is_file(), f"rank 1 never reached the failure\n{output[-4000:]}"
    assert ended - float(stamp.read_text()) < DEADLINE_S
    assert survivors == [], "a rank outlived the launcher"
    assert proc.returncode != 0
    assert "RuntimeError: injected failure on rank 1 at batch 0" in output
    assert list_versions(tmp_path / "models") == []  # a failed run publishes nothing
