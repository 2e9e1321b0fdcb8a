"""Progress lines of the long jobs, in one format a person can follow in `ray job logs`.

    train: step 120/30000 (0.4%) | 983040 samples | loss 3.2100 | lr 8.00e-04 | 2410.5 samples/s | ETA 2 h 51 min
    reinforce: shard student-00001.parquet 3/4 (75.0%) | 128 rows | 12.3 samples/s | ETA 12 s

A line is the job, its position out of the total, then fields separated by `` | ``; the time to finish is the
time per unit done so far in this attempt times the units left (unknown before the first unit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def eta_s(elapsed_s: float, done: int, left: int) -> float | None:
    """Seconds to finish ``left`` more units at the pace of the ``done`` units of ``elapsed_s``; None before any."""
    if done <= 0:
        return None
    return elapsed_s / done * max(left, 0)


def duration(seconds: float | None) -> str:
    """``12 s``, ``4 min 10 s``, ``2 h 05 min``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def line(job: str, unit: str, position: int, total: int, fields: Sequence[str], eta: float | None) -> str:
    """``<job>: <unit> <position>/<total> (<percent>) | <field> | ... | ETA <duration>``."""
    percent = 100.0 * position / total if total else 100.0
    return " | ".join([f"{job}: {unit} {position}/{total} ({percent:.1f}%)", *fields, f"ETA {duration(eta)}"])
