"""The compiled fast path (ext/ -> ``overlay.fastpath._fastpath``) and the Python around it.

- ``loader``: ``load()`` imports the extension or says in one sentence what is wrong and how
  to fix it (so the CLI never shows a traceback for a build problem). Importing this package
  or the loader never needs the extension.
- ``api``: the extension's classes and functions, typed by ``_fastpath.pyi``; the only module
  that imports ``_fastpath`` (import it after ``load()`` has succeeded).
- ``sinks``: ``CoreSink``, the ``core.fdb.TableSink`` that keeps the C tables in step with
  the pure forwarding table.
"""

from overlay.fastpath.loader import FIX, FastPathMissing, load

__all__ = ["FIX", "FastPathMissing", "load"]
