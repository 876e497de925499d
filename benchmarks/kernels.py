"""Kernel benchmark suite: every cell and variant under each backend vs torch.nn and a Python loop.

Same as ``rnnkit bench`` (see :mod:`rnnkit.cli.bench` for what is measured and how). Examples::

    python benchmarks/kernels.py --quick --out benchmarks/out/kernels-cpu      # the recorded run
    python benchmarks/kernels.py --out benchmarks/out/kernels-full              # the issue's full grid
    python benchmarks/kernels.py --quick --device cuda --out benchmarks/out/kernels-cuda
"""

from __future__ import annotations

import sys

from rnnkit.cli.bench import app

if __name__ == "__main__":
    sys.argv[0] = "benchmarks/kernels.py"
    app(prog_name="benchmarks/kernels.py")
