"""Run a server script with its garbage-collector pauses recorded (``--gc-log``).

    python bench/gc_probe.py LOG SCRIPT [ARGS...]

Every collection's generation and duration go to LOG as JSON lines when the process exits;
the server itself is unchanged (it runs as ``__main__`` under :mod:`runpy`).
"""

from __future__ import annotations

import atexit
import gc
import json
import runpy
import sys
import time

log_path, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
pauses: list[tuple[int, float, float]] = []
started = [0.0]


def on_gc(phase: str, info: dict) -> None:
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        now = time.perf_counter()
        pauses.append((info["generation"], now - started[0], time.time()))


def write() -> None:
    with open(log_path, "w") as fh:
        for generation, seconds, at in pauses:
            fh.write(json.dumps({"gen": generation, "ms": round(seconds * 1000, 3), "at": at}))
            fh.write("\n")


gc.callbacks.append(on_gc)
atexit.register(write)
runpy.run_path(script, run_name="__main__")
