"""The ``uti-peft`` command line: one sub-command per job, each registered by the module that does it."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from . import demo, evaluation, hub, legacy, merge, training

    parser = argparse.ArgumentParser(prog="uti-peft", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (demo, legacy, hub, merge, evaluation, training):
        module.add_cli(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileExistsError, FileNotFoundError, OSError) as exc:
        print(f"uti-peft {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
