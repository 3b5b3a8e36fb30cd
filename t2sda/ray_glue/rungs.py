"""Did early stopping judge trials by what they would become? ASHA's rungs against the end.

ASHA stops a trial at a rung when its value there falls below the best 1/reduction_factor of
the values recorded at that rung so far. That is only sound when the value at the rung ranks
trials as their final values do. After a search, for each rung: the Spearman correlation,
over the trials that ran to the end, between their values at the rung and their final
values; and, over every evaluation step the finished trials share, the earliest from which
the correlation stays >= ``RELIABLE`` (a grace period that would have been reliable on this
search's data). No Ray here: tested on fabricated histories.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from t2sda.ray_glue.report import atomic_write
from t2sda.ray_glue.selection import spearman

RELIABLE = 0.5  # a rung correlating less than this with the end stops trials nearly at random


def milestones(grace: int, reduction_factor: float, max_t: int) -> list[int]:
    """ASHA's rung steps (one bracket), as Ray's ``_Bracket`` lays them out, ascending."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return sorted(int(grace * reduction_factor**k) for k in range(count))


def value_at(history: list[tuple[int, float]], step: int) -> float | None:
    """The value ASHA saw at a rung: the first report at or after ``step``."""
    for s, v in sorted(history):
        if s >= step:
            return v
    return None


def analyse(histories: dict[str, list[tuple[int, float]]], *, iters: int, rungs: list[int],
            mode: str = "max") -> dict:
    """histories: trial id -> [(step, value)], the search metric as reported. Trials whose last
    report is at ``iters`` ran to the end; only they have a final value to compare with."""
    sign = 1.0 if mode == "max" else -1.0
    finished = {t: h for t, h in histories.items() if h and max(s for s, _ in h) >= iters}
    final = {t: value_at(h, iters) for t, h in finished.items()}

    def rho(step: int) -> tuple[float | None, int]:
        pairs = [(sign * value_at(h, step), sign * final[t]) for t, h in finished.items()
                 if value_at(h, step) is not None]
        return (spearman([a for a, _ in pairs], [b for _, b in pairs]) if len(pairs) >= 3 else None,
                len(pairs))

    table = []
    for step in rungs:
        r, n = rho(step)
        reached = sum(1 for h in histories.values() if h and max(s for s, _ in h) >= step)
        table.append({"rung": step, "spearman": r, "finished_trials": n, "reached": reached,
                      "reliable": r is not None and r >= RELIABLE})
    # Candidate first rungs: the evaluation steps every finished trial reported, before the end.
    shared = set.intersection(*({s for s, _ in h} for h in finished.values())) if finished else set()
    steps = sorted(s for s in shared if s < iters)
    curve = {s: rho(s)[0] for s in steps}
    suggestion = None
    for s in steps:
        later = [curve[t] for t in steps if t >= s]
        if all(r is not None and r >= RELIABLE for r in later):
            suggestion = s
            break
    return {"rungs": table, "by_step": {str(s): r for s, r in curve.items()},
            "finished_trials": len(finished), "reliable_grace": suggestion, "threshold": RELIABLE}


def format_rungs(result: dict) -> str:
    lines = [f"ASHA rungs against the end ({result['finished_trials']} trials ran to the end; "
             f"spearman >= {result['threshold']} counts as reliable):"]
    for row in result["rungs"]:
        r = "n/a (fewer than 3 finished trials)" if row["spearman"] is None else f"{row['spearman']:+.2f}"
        lines.append(f"  rung at step {row['rung']}: spearman {r} over {row['finished_trials']} "
                     f"trials ({row['reached']} reached it)")
    for row in result["rungs"]:
        if row["spearman"] is not None and not row["reliable"]:
            grace = result["reliable_grace"]
            hint = (f"--grace-period {grace} would have been reliable on this search's data"
                    if grace is not None and grace > row["rung"] else
                    "no earlier step ranked trials as the end did: --scheduler none")
            lines.append(f"WARNING: the rung at step {row['rung']} ranks trials unlike their final "
                         f"values (spearman {row['spearman']:+.2f} < {result['threshold']}): it "
                         f"stops trials by noise; {hint}")
    return "\n".join(lines)


def write_rungs(histories, out_dir: Path, *, iters: int, rungs: list[int], mode: str) -> str:
    """rungs.json beside results.csv; returns the summary lines."""
    result = analyse(histories, iters=iters, rungs=rungs, mode=mode)
    atomic_write(Path(out_dir) / "rungs.json", json.dumps(result, indent=2) + "\n")
    return format_rungs(result)
