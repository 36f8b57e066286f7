"""The parent side: fresh case processes under a time budget, and the schedule."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..runner import alternating
from .params import ENTRY_POINT, MIN_CASE_S, GpuParams
from .report import Run


def spawn(names: list[str], workdir: Path, timeout: float) -> list[dict[str, Any]]:
    """Run cases in one fresh ``python scripts/bench_gpu.py --case ...`` process, killed after ``timeout``
    seconds; a case that did not report comes back as ``{"failed": why, "timed_out": bool}``."""
    cmd = [sys.executable, str(ENTRY_POINT), "--workdir", str(workdir)]
    for name in names:
        cmd += ["--case", name]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, timed_out = proc.stdout, False
        why = None if proc.returncode == 0 else f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        timed_out, why = True, f"killed after its {timeout:.0f} s limit"
    wall = time.perf_counter() - start
    reported = {data["case"]: data for data in map(json.loads, filter(lambda line: line.startswith("{"),
                                                                       stdout.splitlines()))}
    results = [{**reported[name], "process_wall_s": wall} if name in reported else
               {"case": name, "failed": why or "no result", "timed_out": timed_out, "process_wall_s": wall}
               for name in names]
    failed = [r["case"] for r in results if "failed" in r]
    last_line = (why or "no result").strip().splitlines()[-1]
    print(f"  {' + '.join(names)}: {wall:.1f} s" + (f"  FAILED {failed}: {last_line}" if failed else ""),
          file=sys.stderr, flush=True)
    return results


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
