"""The parent side: fresh case processes under a time budget, and the schedule."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .. import runner
from ..runner import alternating
from .params import ENTRY_POINT, MIN_CASE_S, GpuParams
from .report import Run


def spawn(names: list[str], workdir: Path, timeout: float) -> list[dict[str, Any]]:
    """The bench's `bench.runner.spawn` on ``scripts/bench_gpu.py``; a case that did not report (crash, timeout) is
    marked ``{"failed": why, "timed_out": bool}``, as the report reads it."""
    results = runner.spawn(names, workdir, timeout, entry_point=ENTRY_POINT)
    return [{**r, "failed": r.get("error") or f"killed: {r.get('killed_by')}", "timed_out": bool(r.get("timed_out"))}
            if "error" in r or r.get("timed_out") else r for r in results]


def schedule(params: GpuParams) -> list[tuple[list[str], float]]:
    """The plan as (cases of one process, its timeout): every measurement once first (ours and merged loads, the
    legacy load, inference, training), then the other load repetitions (ours and merged alternating which goes
    first), and last the optional mean-resizing legacy load; so that a budget that runs short still leaves one of
    each. ``--quick`` runs them all in one process (the interpreter + import start-up would dominate)."""
    loads = alternating(["load-ours", "load-merged"], params.reps, params.case_timeout)
    once = [(name, params.case_timeout) for name in ("load-legacy", "inference", "train-ours", "train-legacy")]
    steps = loads[:2] + once + loads[2:] + [("load-legacy-mean", params.mean_resizing_timeout)]
    if params.quick:
        return [([name for name, _ in steps], sum(timeout for _, timeout in steps))]
    return [([name], timeout) for name, timeout in steps]


def run_schedule(run: Run) -> None:
    """Run every step in fresh processes, each timeout clipped to what is left of the budget; a step that
    cannot have ``MIN_CASE_S`` is recorded as skipped."""
    deadline = run.started + run.params.budget
    for names, timeout in schedule(run.params):
        left = deadline - time.perf_counter()
        if left < MIN_CASE_S and not run.params.quick:
            run.add([{"case": name, "failed": f"skipped: {left:.0f} s of the budget left", "timed_out": False}
                     for name in names])
            continue
        run.add(spawn(names, run.workdir, timeout if run.params.quick else min(timeout, left)))
