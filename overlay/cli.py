"""The ``overlay`` command. Subcommands arrive with their issues; each is a small function here
that parses flags, calls into the package, and turns expected failures into one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from overlay import __version__
from overlay.fastpath import FastPathMissing, load


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="overlay",
        description=(
            "A userspace VXLAN overlay network for containers (RFC 7348), wire-compatible "
            "with the Linux kernel's vxlan device."
        ),
    )
    parser.add_argument("--version", action="store_true", help="print the version and whether the fast path is built")
    return parser


def version_line() -> str:
    """'overlay 0.1.0 (fast path: ok)' — and raises FastPathMissing if the extension is absent."""
    load()
    return f"overlay {__version__} (fast path: ok)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.version:
            print(version_line())
            return 0
        parser.print_help()
        return 0
    except FastPathMissing as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 1
    except UserError as e:
        print(f"overlay: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
