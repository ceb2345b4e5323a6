"""The `overlay` command as a user runs it: a real process, its output and exit status."""

from __future__ import annotations

import subprocess
import sys

from overlay import __version__


def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "overlay", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_version_names_the_release_and_the_fast_path() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"overlay {__version__} (fast path: ok)"


def test_missing_fast_path_is_one_clear_line_not_a_traceback() -> None:
    # The one fault that cannot be produced without breaking the install: block the import.
    result = run(
        code=(
            "import sys; sys.modules['overlay.fastpath._fastpath'] = None\n"
            "from overlay.cmd.cli import main; sys.exit(main(['--version']))"
        )
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "overlay.fastpath._fastpath" in lines[0] and "pip install ." in lines[0]


def test_help_describes_the_project() -> None:
    result = run("--help")
    assert result.returncode == 0 and "VXLAN" in result.stdout
