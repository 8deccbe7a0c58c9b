"""The pinned linter (ruff, the dev extra) passes on every tree `make lint` checks, so CI catches what
`make lint` would: an undefined name in a script no test imports (scripts/gpu_check.py once had one)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ruff_passes_on_the_linted_trees():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "hywia", "server", "tests", "benchmarks", "scripts"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
