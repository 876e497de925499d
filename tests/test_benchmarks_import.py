"""Every benchmark script still imports against the current package (their ``main()`` is not run here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"_bench_{script[:-3]}", BENCH / script)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        if e.name and e.name.split(".")[0] not in ("rnnkit", *(p.stem for p in BENCH.glob("*.py"))):
            pytest.skip(f"optional dependency {e.name!r} not installed")
        raise
    assert callable(getattr(module, "main", getattr(module, "app", None))), f"{script}: no main() or app"
    sys.modules.pop(spec.name, None)
