"""Benchmarks: each module is run as ``python -m bench.<name>`` and compares side by side in one run."""

import subprocess
import time
from pathlib import Path


def results_dir() -> Path:
    """bench/results/<date>-<commit>/ (the commit measured), created."""
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        or "nogit"
    )
    out = Path(__file__).parent / "results" / f"{time.strftime('%Y-%m-%d')}-{commit}"
    out.mkdir(parents=True, exist_ok=True)
    return out
