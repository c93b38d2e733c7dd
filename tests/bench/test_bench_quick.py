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


def test_gpu_benchmark_code_runs_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    # No GPU here: --allow-cpu runs the same model-bound and end-to-end code, so gpu.sh does not rot unseen.
    proc = run([sys.executable, str(BENCH / "_gpu.py"), "--allow-cpu", "--quick"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| model-bound", "| end to end"))]
    configs = ("fp32", "bf16-mixed", "channels_last + bf16-mixed + compile")
    assert [row.split(" | ")[0] for row in rows] == [
        *(f"| model-bound (synthetic batch on the device), plain loop, {name}" for name in configs),
        "| end to end (JPEGs), plain loop, fp32",
        *(f"| end to end (JPEGs), retrain, {name}" for name in configs),
    ]
    assert all(float(row.split(" | ")[1].split()[0].replace(",", "")) > 0 for row in rows)  # images/s measured
    assert not list(tmp_path.iterdir())
