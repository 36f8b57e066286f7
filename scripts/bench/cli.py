"""The command line of ``python scripts/bench.py``: flags, the parameters they give, and the run from setup to
``bench.json`` + ``bench.md``; with the hidden ``--case`` flag, the child process that runs the named cases."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from . import __doc__ as PACKAGE_DOC
from .cases import CASES, LAYER_CHOICES, run_cases_here
from .params import QUICK_SHAPE, Params, Paths, Shape
from .report import build_report, markdown
from .runner import Runner, schedule
from .workdir import prepare_depths, prepare_peers, prepare_tied, prepare_workdir


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags of ``scripts/bench.py`` (the hidden ``--case`` is how the runner starts a case process)."""
    parser = argparse.ArgumentParser(
        description=PACKAGE_DOC.split("\n\n")[0],
        epilog="Defaults take ~36 minutes on a 2-core CPU and ~30 GB of checkpoints in the work dir. Issue #5's full "
               "sizes on a bigger machine: --prefill-tokens 512 --decode-steps 32 --train-seq-len 512 "
               "--train-steps 3 --full-warmup. The GPU benchmark is scripts/bench_gpu.sh.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where bench.json and bench.md go")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the checkpoints are written (~6 GB at full shape); default: a temporary "
                             "directory under /tmp, removed at the end. A given --workdir is kept and reused when "
                             "it already holds checkpoints of the same shape")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (fresh process each for load/convert)")
    parser.add_argument("--load-reps", type=int, default=Params.load_reps,
                        help="repetitions of each load case of the --layers sweep (a fresh process each)")
    parser.add_argument("--layers", type=layer_counts, default=Params.depths, metavar="N[,N...]",
                        help="decoder-layer counts of Qwen3-8B's shapes the load is measured at (one base and one "
                             "merged checkpoint each); the first is the base of every other case")
    parser.add_argument("--prefill-tokens", type=int, default=64, help="prompt length of the inference case")
    parser.add_argument("--decode-steps", type=int, default=16, help="greedy decode steps after the prefill")
    parser.add_argument("--train-seq-len", type=int, default=2,
                        help="sequence length of the training step (2 = one predicted token). Small by default: "
                             "on a CPU without native bf16 the lm_head's input gradient (grad_out @ weight, K = vocab) "
                             "runs at ~0.3 GFLOP/s, ~20 s per token, in both recipes")
    parser.add_argument("--train-steps", type=int, default=1, help="timed training steps (after a warm-up)")
    parser.add_argument("--full-warmup", action="store_true",
                        help="warm up with a full training step instead of a forward + an optimizer step on zero "
                             "gradients (which costs no backward pass)")
    parser.add_argument("--legacy-timeout", type=float, default=90.0,
                        help="seconds allowed to the legacy load with transformers defaults (mean-resizing takes "
                             "~30 min at these shapes on a 2-core CPU); reported as a lower bound when hit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the rows and the token ids")
    parser.add_argument("--merge-layers", type=int, nargs="+", default=[1, 4], choices=LAYER_CHOICES,
                        metavar="N", help="decoder-layer counts of the bases the merge case runs on")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (uti_peft.tiny sizes), 1 repetition, all cases in one child process: the "
                             "same code paths in well under a minute, for tests; timings mean nothing")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def layer_counts(text: str) -> tuple[int, ...]:
    """``--layers 1,4,8``: distinct decoder-layer counts, each one that has a case, in the order given."""
    try:
        counts = tuple(dict.fromkeys(int(part) for part in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts such as 1,4,8, got {text!r}")
    if not counts or any(n not in LAYER_CHOICES for n in counts):
        raise argparse.ArgumentTypeError(f"layer counts must be in 1..{LAYER_CHOICES[-1]}, got {text!r}")
    return counts


def params_from_args(args: argparse.Namespace) -> Params:
    """The run's ``Params``: the flags at Qwen3-8B shapes, or ``--quick``'s fixed tiny run (tests)."""
    if args.quick:
        return Params(shape=QUICK_SHAPE, reps=1, prefill_tokens=16, decode_steps=4, train_seq_len=16, train_steps=1,
                      legacy_timeout=min(args.legacy_timeout, 30.0), quick=True, seed=args.seed,
                      full_warmup=args.full_warmup, merge_layers=(QUICK_SHAPE.layers,), load_probe_tokens=16,
                      depths=(QUICK_SHAPE.layers, QUICK_SHAPE.layers + 1), load_reps=1)
    return Params(shape=replace(Shape(), layers=args.layers[0]), reps=args.reps, prefill_tokens=args.prefill_tokens,
                  decode_steps=args.decode_steps, train_seq_len=args.train_seq_len, train_steps=args.train_steps,
                  legacy_timeout=args.legacy_timeout, quick=False, seed=args.seed, full_warmup=args.full_warmup,
                  merge_layers=tuple(args.merge_layers), depths=args.layers, load_reps=args.load_reps)


def main(argv: Optional[list[str]] = None) -> int:
    """Run one case process (``--case``), or the whole bench: set up the work dir, run the schedule, write
    ``--out``/bench.json and bench.md and print the markdown. The temporary work dir is removed at the end."""
    args = parse_args(argv)
    if args.case:
        run_cases_here(args.case, args.workdir)
        return 0
    started, load_at_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    params = params_from_args(args)
    temporary = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="uti-bench-")) if temporary else args.workdir.resolve()
    paths = Paths(workdir)
    try:
        print(f"setup in {workdir}", file=sys.stderr, flush=True)
        setup = prepare_workdir(paths, params)
        setup.update(prepare_depths(paths, params))
        setup.update(prepare_peers(paths, params))
        setup.update(prepare_tied(paths, params))
        print(f"  {json.dumps({k: round(v, 1) for k, v in setup.items()})}", file=sys.stderr, flush=True)
        runner = Runner(workdir, params)
        runner.run(schedule(params))
        report = build_report(runner, paths, params, setup, started)
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["loadavg_start"] = load_at_start
    report["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["bench_wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "bench.md").write_text(markdown(report))
    print((args.out / "bench.md").read_text())
    return 0
