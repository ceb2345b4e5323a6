"""Benchmarks: each module is run as ``python -m bench.<name>`` and compares side by side in one run."""

import math
import subprocess
import time
from pathlib import Path


def progress(text: str) -> None:
    """A progress line while a benchmark runs."""
    print(f"... {text}", flush=True)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


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
