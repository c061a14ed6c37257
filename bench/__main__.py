"""``python -m bench``: the CPU benchmark suite, same arguments as ``python bench/run.py``."""

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv[0] = "bench/run.py"
    runpy.run_path(str(Path(__file__).with_name("run.py")), run_name="__main__")
