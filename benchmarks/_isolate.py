"""Run one measurement in a fresh process: its own peak memory, and a time limit.

A fresh (spawned) process per measurement keeps one run's memory out of the next one's
peak. The measured function does its own setup and timing and returns a dict; the peak
resident set size of the process is added to it. A run past ``timeout`` is stopped and
reported with ``stopped=True`` and the peak it had reached.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty

GB = 1024**3


def peak_rss(pid: int | str = "self") -> int:
    """Peak resident set size in bytes (Linux ``VmHWM``; ``ru_maxrss`` elsewhere)."""
    return _status(pid, "VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident set size now, in bytes (Linux only; 0 elsewhere)."""
    return _status("self", "VmRSS")


def _status(pid: int | str, field: str) -> int:
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(queue: mp.Queue, func: Callable[..., dict], args: tuple) -> None:
    try:
        result = func(*args)
        queue.put({**result, "peak_rss_gb": peak_rss() / GB})
    except BaseException:
        queue.put({"error": traceback.format_exc()})


def isolated(func: Callable[..., dict], *args, timeout: float) -> dict:
    """``func(*args)`` in a spawned process; ``{"stopped": True, ...}`` past ``timeout`` s."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, func, args))
    process.start()
    deadline = time.monotonic() + timeout
    while process.is_alive() and queue.empty() and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        result = queue.get(timeout=5)
    except Empty:
        if not process.is_alive():
            raise RuntimeError(f"{func.__name__}{args} died (exit {process.exitcode})") from None
        reached = peak_rss(process.pid) / GB
        process.kill()
        process.join()
        return {"stopped": True, "peak_rss_gb": reached}
    process.join()
    if "error" in result:
        raise RuntimeError(f"{func.__name__}{args} failed:\n{result['error']}")
    return {"stopped": False, **result}
