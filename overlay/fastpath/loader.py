"""Loads the compiled fast path, or says in one sentence what is wrong and how to fix it."""

from __future__ import annotations

import importlib
from types import ModuleType

FIX = "reinstall with 'pip install .' (needs a C compiler and the Python headers)"


class FastPathMissing(RuntimeError):
    """The compiled extension overlay.fastpath._fastpath is absent or does not import."""


def load() -> ModuleType:
    """Import overlay.fastpath._fastpath, or raise FastPathMissing saying what is wrong and how
    to fix it. Typed code imports the same objects from ``overlay.fastpath.api``."""
    try:
        return importlib.import_module("overlay.fastpath._fastpath")
    except ImportError as e:
        raise FastPathMissing(
            f"the compiled fast path overlay.fastpath._fastpath is missing or broken ({e}); {FIX}"
        ) from e
