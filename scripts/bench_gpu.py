#!/usr/bin/env python
"""GPU benchmark of uti-peft's row-extension adapter at full Qwen3-8B shape, on one device.

The entry point of ``python scripts/bench_gpu.py [--quick] [--device D] [...]`` (``--help`` lists the flags), and
of the case processes it starts (``--case NAME``); ``scripts/bench_gpu.sh OUT`` is the one command to run on a GPU
machine. The code is ``scripts/bench/gpu/``: what is measured and why is in its docstring. ``scripts/`` is not
installed, so this file puts its own directory first on ``sys.path`` (as running a script does) before importing
the package.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.gpu.cli import main  # noqa: E402  (needs the path above)

if __name__ == "__main__":
    sys.exit(main())
