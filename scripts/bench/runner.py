"""The parent side: the measurement schedule, and running it in fresh child processes of the entry point
(``python scripts/bench.py --workdir W --case NAME ...``), collecting each case's JSON line, its repetitions, and
a timeout or crash as a result of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .params import PEERS, Params

# the entry point the child processes run: scripts/bench.py, beside this package
ENTRY_POINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench.py")


def spawn(names: list[str], workdir: Path, timeout: float, entry_point: "str | Path" = ENTRY_POINT) -> list[dict[str, Any]]:
    """Run cases in one fresh ``python <entry_point> --case ...`` process (default: scripts/bench.py); a case that
    did not report (timeout, crash) comes back as ``{"timed_out": ...}`` / ``{"error": ...}``."""
    cmd = [sys.executable, str(entry_point), "--workdir", str(workdir)]
    for name in names:
        cmd += ["--case", name]
    start = time.perf_counter()
    limit = None
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        stdout, stderr, failure = proc.stdout, proc.stderr, None if proc.returncode == 0 else proc.returncode
        if proc.returncode == -signal.SIGALRM:  # kill_after() fired: the case ran out of its own time limit
            failure, limit = "timeout", "case time limit"
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr, failure, limit = "", "timeout", f"process timeout {timeout:g}s"
    wall = time.perf_counter() - start
    results = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            data = json.loads(line)
            results[data["case"]] = data
    out = []
    for name in names:
        if name in results:
            out.append({**results[name], "process_wall_s": wall})
        elif failure == "timeout":
            out.append({"case": name, "timed_out": True, "killed_by": limit})
        else:
            out.append({"case": name, "error": f"exit {failure}: {stderr.strip()[-2000:]}"})
    print(f"  {' + '.join(names)}: {wall:.1f}s" + (f" ({failure})" if failure else ""), file=sys.stderr, flush=True)
    return out


class Runner:
    """Runs the schedule: one fresh process per case (full), or all cases in a single child process
    (--quick, where the ~8 s interpreter + import start-up of each process would dominate)."""

    def __init__(self, workdir: Path, params: Params):
        self.workdir, self.params = workdir, params
        self.results: dict[str, list[dict[str, Any]]] = {}

    def run(self, steps: list[tuple[str, float]]) -> None:
        """Run the steps, appending each case's result to its list in ``results`` (repetitions in order)."""
        if self.params.quick:
            batches = [([name for name, _ in steps], sum(timeout for _, timeout in steps))]
        else:
            batches = [([name], timeout) for name, timeout in steps]
        for names, timeout in batches:
            for result in spawn(names, self.workdir, timeout):
                self.results.setdefault(result["case"], []).append(result)

    def values(self, case: str, key: str) -> list[float]:
        """The ``key`` of every repetition of ``case`` that has it (failed repetitions have not)."""
        return [r[key] for r in self.results.get(case, []) if key in r]

    def first(self, case: str) -> dict[str, Any]:
        """The first result of ``case`` (an empty dict when it never ran)."""
        return (self.results.get(case) or [{}])[0]


def alternating(pair: list[str], reps: int, timeout: float) -> list[tuple[str, float]]:
    """``reps`` repetitions of ours and its reference(s), the order reversed each time (ABBA..., ABCCBA...), so
    that none always runs in the same position (warm caches, load of a shared machine)."""
    return [(name, timeout) for rep in range(reps) for name in (pair if rep % 2 == 0 else pair[::-1])]


def schedule(params: Params) -> list[tuple[str, float]]:
    """The measurement plan as (case, process timeout) steps; ours and the reference alternate which goes
    first from one repetition to the next."""
    budget = 600.0 if not params.quick else 120.0
    steps = []
    for layers in params.depths:
        steps.append((f"cache-{layers}L", budget))  # the depth's checkpoints back into the page cache
        steps += alternating([f"load-ours-{layers}L", f"load-merged-{layers}L"], params.load_reps, budget)
    steps += [(f"head-{kind}", budget) for _ in range(params.reps) for kind in ("map", "copy", "plain")]
    steps.append(("load-legacy-nomean", budget))  # informational, once
    # PEFT's own ways beside ours at the main depth, the three rotating which goes first (issue #26)
    steps += alternating([f"load-ours-{params.shape.layers}L", *(f"load-peer-{kind}" for kind in PEERS)],
                         params.reps, budget)
    steps += [("inference", budget), ("switch", budget), ("train-ours", budget), ("train-legacy", budget)]
    steps += [(f"train-peer-{kind}", budget) for kind in PEERS]
    # the same on a tied base (ours and PEFT's ways; the legacy load once, for the logits)
    steps += [("cache-tied", budget), ("load-legacy-nomean-tied", budget)]
    steps += alternating(["load-ours-tied", *(f"load-peer-{kind}-tied" for kind in PEERS)], params.reps, budget)
    steps += [("train-ours-tied", budget), *((f"train-peer-{kind}-tied", budget) for kind in PEERS)]
    steps += alternating(["head-loss-fused", "head-loss-unfused"], params.reps, budget)
    steps += alternating(["convert-ours", "convert-plain"], params.reps, budget)
    for layers in params.merge_layers:
        steps.append((f"cache-{layers}L", budget))  # the base and the adapter in the page cache: no run reads the disk
        # ours against the copy limit (the target), then against PEFT's way (information): ours runs in both
        steps += alternating([f"merge-ours-{layers}L", f"merge-floor-{layers}L"], params.reps, budget)
        steps += alternating([f"merge-ours-{layers}L", f"merge-peft-{layers}L"], params.reps, budget)
        steps += [(f"extract-{layers}L", budget)] * params.reps
    # last (so that in --quick's single process nothing runs after it): it ends itself after --legacy-timeout
    steps.append(("load-legacy", params.legacy_timeout + 120.0))
    return steps
