"""Every benchmark in bench/ still runs: each script in --quick mode prints its table and the machine it ran on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_runs_quick_and_prints_a_table_with_the_machine(script: str, tmp_path: Path) -> None:
    proc = run([sys.executable, str(BENCH / script), "--quick"], tmp_path)
    assert proc.returncode == 0, f"{script} --quick failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| figure") and "ratio" in line for line in lines), proc.stdout[-2000:]
    assert any(line.startswith("Machine:") and "cores" in line and "torch" in line for line in lines)
    assert not list(tmp_path.iterdir()), "a benchmark left files behind in the folder it ran from"


def test_gpu_script_says_it_needs_cuda_when_there_is_none(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/gpu.sh would run for minutes")
    proc = run(["bash", str(BENCH / "gpu.sh"), "--quick"], tmp_path)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "make bench" in proc.stderr
