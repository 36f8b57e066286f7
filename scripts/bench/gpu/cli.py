"""The command line of ``python scripts/bench_gpu.py``: flags, the run from setup to the report, and the hidden
``--case`` flag of the case processes."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from ..params import QUICK_SHAPE, Paths, Shape
from ..report import machine_info, rows_bytes_of
from . import __doc__ as PACKAGE_DOC
from .cases import CASES, run_cases_here
from .params import GpuParams
from .report import markdown
from .runner import Run, run_schedule
from .workdir import base_bytes, prepare, temporary_workdir


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The flags of ``scripts/bench_gpu.py`` (the hidden ``--case`` is how the parent starts a case process)."""
    parser = argparse.ArgumentParser(description=PACKAGE_DOC.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where bench_gpu.json/.md go")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the checkpoints go (~34 GB at full shape) and are kept (a second run with the "
                             "same shape reuses them); default: a temporary directory, in /dev/shm when it has room, "
                             "removed at the end")
    parser.add_argument("--device", default="cuda", help="torch device of the measurements")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (a fresh process each for the loads)")
    parser.add_argument("--layers", type=int, default=36, help="Qwen3-8B-shaped decoder layers")
    parser.add_argument("--load-tokens", type=int, default=128, help="tokens of the first forward after a load")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the inference case")
    parser.add_argument("--decode-steps", type=int, default=32, help="greedy decode steps after the prefill")
    parser.add_argument("--train-seq-len", type=int, default=512, help="sequence length of the training step")
    parser.add_argument("--train-steps", type=int, default=3, help="timed training steps (after a warm-up step)")
    parser.add_argument("--case-timeout", type=float, default=120.0, help="seconds allowed to each case process")
    parser.add_argument("--mean-resizing-timeout", type=float, default=60.0,
                        help="seconds allowed to the (optional, last) legacy load with transformers' mean-resizing")
    parser.add_argument("--budget", type=float, default=285.0,
                        help="seconds for the whole run: each case's timeout is clipped to what is left")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, the rows and the token ids")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shape (uti_peft.tiny sizes), 1 repetition, short sequences, every case in one "
                             "child process: the same code paths in seconds, for tests (with --device cpu)")
    parser.add_argument("--case", action="append", choices=sorted(CASES), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def params_from_args(args: argparse.Namespace) -> GpuParams:
    """The run's parameters: the flags at Qwen3-8B shape, or ``--quick``'s fixed tiny run."""
    common = dict(device=args.device, case_timeout=args.case_timeout,
                  mean_resizing_timeout=args.mean_resizing_timeout, budget=args.budget, seed=args.seed)
    if args.quick:
        return GpuParams(shape=QUICK_SHAPE, reps=1, load_tokens=8, prefill_tokens=16, decode_steps=4,
                         train_seq_len=16, train_steps=1, quick=True, **common)
    return GpuParams(shape=replace(Shape(), layers=args.layers), reps=args.reps, load_tokens=args.load_tokens,
                     prefill_tokens=args.prefill_tokens, decode_steps=args.decode_steps,
                     train_seq_len=args.train_seq_len, train_steps=args.train_steps, quick=False, **common)


def main(argv: Optional[list[str]] = None) -> int:
    """Run case processes (``--case``), or the whole benchmark: check the device, set up the work dir, run the
    schedule, write OUT after each step. Exit 0 when every required case ran and the exactness facts hold, 1
    otherwise (OUT still holds what was measured), 2 when the device is not there."""
    args = parse_args(argv)
    if args.case:
        return run_cases_here(args.case, args.workdir)
    params = params_from_args(args)
    if params.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench_gpu: error: --device {params.device} but torch {torch.__version__} sees no CUDA device "
              "(use --device cpu for a --quick check)", file=sys.stderr)
        return 2
    import uti_peft

    machine = {**machine_info(), "cuda_build": torch.version.cuda, "uti_peft": uti_peft.__version__,
               "uti_peft_path": os.path.dirname(uti_peft.__file__)}
    print(f"torch {machine['torch']} (CUDA {machine['cuda_build']}), transformers {machine['transformers']}, "
          f"peft {machine['peft']}", file=sys.stderr, flush=True)
    needed = 2 * base_bytes(params.shape) + 3 * rows_bytes_of(params.shape)  # base, merged, adapter, legacy
    workdir = args.workdir.resolve() if args.workdir else temporary_workdir(needed)
    run = Run(params, args.out, workdir, machine)
    try:
        print(f"setup in {workdir}", file=sys.stderr, flush=True)
        try:
            run.setup_s = prepare(Paths(workdir), params)
        except Exception:
            run.setup_error = traceback.format_exc()
            print(run.setup_error, file=sys.stderr)
        run.write()
        if run.setup_error is None:
            run_schedule(run)
        run.complete = True
        report = run.write()
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(markdown(report))
    return 0 if report["ok"] else 1
