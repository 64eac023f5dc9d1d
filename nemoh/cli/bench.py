"""`nemoh bench SCRIPT [ARGS...]`: run a script from benchmarks/ (a source checkout's) with its own arguments."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

from nemoh.cli.common import CLIError

BENCHMARKS_DIR = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def run_bench(argv: list[str]) -> int:
    scripts = sorted(p.stem for p in BENCHMARKS_DIR.glob("*.py") if not p.stem.startswith("_"))
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: nemoh bench SCRIPT [ARGS...]\n\nruns benchmarks/SCRIPT.py (or a path to a script)")
        print("scripts: " + (", ".join(scripts) if scripts else f"(none found in {BENCHMARKS_DIR})"))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    path = Path(name) if name.endswith(".py") else BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise CLIError(f"no benchmark script {name}; available: {', '.join(scripts) or 'none'}")
    saved = sys.argv
    sys.argv = [str(path), *rest]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return 0
