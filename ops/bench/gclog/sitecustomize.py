"""Bench aid: every process started with this folder on PYTHONPATH logs its collections.

With GCLOG_DIR set, each full (generation 2) collection, and any collection of 20 ms
or more, is appended to GCLOG_DIR/<pid>.log with its duration, what it collected and
how many objects were frozen. GC_POLICY_OFF=1 puts back the start-only
`gc.collect(); gc.freeze()` of services (the behaviour before shared/bus/gc_freeze.py),
for a before/after. Usage: ops/bench/RESULTS.md, "gc.freeze after full collections".
"""

import gc
import os
import sys
import time
from typing import Any

_dir = os.environ.get("GCLOG_DIR")
if _dir:
    _started = [0.0]
    _path = os.path.join(_dir, f"{os.getpid()}.log")
    _argv = " ".join(sys.argv[:4])

    def _log(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
            return
        ms = (time.perf_counter() - _started[0]) * 1000
        if ms >= 20 or info["generation"] == 2:
            with open(_path, "a") as out:
                out.write(
                    f"{time.time():.2f} gen={info['generation']} ms={ms:.1f}"
                    f" collected={info['collected']} frozen={gc.get_freeze_count()}"
                    f" argv={_argv}\n"
                )

    gc.callbacks.append(_log)

if os.environ.get("GC_POLICY_OFF") == "1":
    from ikefarm.shared.bus import gc_freeze

    def _start_only() -> None:
        gc.collect()
        gc.freeze()

    gc_freeze.install = _start_only  # type: ignore[assignment]
