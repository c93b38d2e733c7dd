"""A CLI process that skips the interpreter's teardown must still write everything and keep its exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, logging, sys, threading
from retrain.utils.fast_exit import exit_without_teardown

out = sys.argv[1]
logging.basicConfig(filename=out + "/run.log", level=logging.INFO)
logging.info("last log line")
atexit.register(lambda: open(out + "/atexit", "w").write("ran"))
release = threading.Event()
threading.Thread(target=lambda: (release.wait(), open(out + "/thread", "w").write("done"))).start()
release.set()
sys.stdout.write("buffered, no newline")
exit_without_teardown(3)
"""


def test_exit_without_teardown_joins_threads_runs_atexit_flushes_and_keeps_the_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"
    assert "last log line" in (tmp_path / "run.log").read_text()
