"""End a finished CLI process without the interpreter's teardown, which only frees memory the OS takes back anyway.

After `import torch` (and torchvision, Lightning), Python's shutdown spends 0.7-2 s of CPU destroying objects one by
one (measured on a 2-core CPU: 0.7 s after `import torch` alone, 1.3 s with torchvision and one forward pass, 2.2 s
after a `train.py` run). Every output is written by then, so exiting here does what the interpreter's own exit does
first, in the same order, and stops before the teardown: join the non-daemon threads, run the atexit handlers
(logging.shutdown, multiprocessing's children, TensorBoard's writers), flush stdout and stderr, `os._exit`. The
standard library ends its forked `multiprocessing` children the same way (`multiprocessing/process.py`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with `code` once threads, atexit handlers and std streams are done: seconds sooner than `sys.exit`."""
    # Private, but the exact steps Py_FinalizeEx takes before its teardown, and the ones multiprocessing takes.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (`| head`) or a stream already closed
            stream.flush()
    os._exit(code)
