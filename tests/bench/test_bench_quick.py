"""Every benchmark in bench/ still runs: each script in --quick mode prints its table and the machine it ran on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import composed

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Benchmarks are not tests: their quick runs (10-45 s of CPU each, some starting several `python train.py` or
# `serve.py` processes) run in `make test-slow` and `make bench BENCH_ARGS=--quick`, not in `make test`.
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if not p.name.startswith("_"))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
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


@pytest.mark.slow
def test_gpu_benchmark_code_runs_on_the_cpu_at_toy_sizes(tmp_path: Path) -> None:
    # No GPU here: --allow-cpu runs the model-bound code at toy sizes, so gpu.sh does not rot unseen. Its end-to-end
    # half calls train_throughput.py's plain() and retrain(), which that script's quick run above checks.
    proc = run([sys.executable, str(BENCH / "_gpu.py"), "--allow-cpu", "--quick", "--skip-e2e"], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| model-bound")]
    configs = ("fp32", "bf16-mixed", "channels_last + bf16-mixed + compile")
    assert [row.split(" | ")[0] for row in rows] == [
        f"| model-bound (synthetic batch on the device), plain loop, {name}" for name in configs
    ]
    assert all(float(row.split(" | ")[1].split()[0].replace(",", "")) > 0 for row in rows)  # images/s measured
    assert not list(tmp_path.iterdir())


def test_the_gpu_benchmark_overrides_compose_into_the_train_config(tmp_path: Path) -> None:
    # What gpu.sh passes to train.py on the GPU machine: a stale key would only show there, after minutes of set-up.
    sys.path.insert(0, str(BENCH))
    try:
        from _gpu import CONFIGS, OVERRIDES
    finally:
        sys.path.remove(str(BENCH))
    assert set(OVERRIDES) == set(CONFIGS)
    for name, overrides in OVERRIDES.items():
        cfg = composed(tmp_path, *overrides)
        assert cfg.trainer.accelerator == "gpu", name
        assert cfg.model.compile == ("compile" in name) and cfg.model.channels_last == ("channels_last" in name)
