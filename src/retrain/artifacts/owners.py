"""Who holds a registry reservation: this process's identity, and whether a recorded owner is still running.

A pid names one process only together with its start time, within one boot of one kernel and one pid
namespace (containers have their own), so the record keeps all of them. Linux's /proc gives them; elsewhere
the extra fields are None and only the pid and host name count.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any


def owner_record() -> dict[str, Any]:
    """What a reservation records about the process that made it, for `registry gc` to judge later."""
    pid = os.getpid()
    return {"pid": pid, "start": process_start(pid), "created": time.time(), **this_host()}


def _read_proc(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (Linux); with the pid it names one process for good."""
    stat = _read_proc(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split() if stat else []  # the command name may hold spaces and ')'
    return fields[19] if len(fields) > 19 else None


def this_host() -> dict[str, str | None]:
    """Host name, boot id and pid namespace: where a recorded pid means this very process table."""
    # Pids are only comparable within one boot of one kernel and one pid namespace (containers have their own).
    try:
        pidns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot_id": _read_proc("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def owner_gone(owner: dict[str, Any], pid: int) -> tuple[bool, str]:
    """Whether the recorded owner (a pid of this host) has exited, and why, in one line."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True, f"owner pid {pid} on this host is gone"
    except PermissionError:
        pass  # alive, run by another user
    start = owner.get("start")
    if start is not None and process_start(pid) not in (None, start):
        return True, f"owner pid {pid} on this host is gone (the pid now belongs to another process)"
    return False, f"owner pid {pid} on this host is still running"
