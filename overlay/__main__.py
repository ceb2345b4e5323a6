"""``python -m overlay`` is the ``overlay`` command."""

import sys

from overlay.cmd.cli import main

sys.exit(main())
