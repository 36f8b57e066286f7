#!/usr/bin/env python
"""Side-by-side benchmark of uti-peft's row-extension adapter at Qwen3-8B embedding shapes (issue #5).

The entry point of ``python scripts/bench.py [--quick] [...]`` (``--help`` lists the flags), and of the case
processes it starts (``--case NAME``). The code is the package ``scripts/bench/``: what is measured and why is in
its docstring (``bench/__init__.py``). ``scripts/`` is not installed, so this file puts its own directory first on
``sys.path`` (as running a script does) before importing the package.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench.cli import main  # noqa: E402  (needs the path above)

if __name__ == "__main__":
    sys.exit(main())
