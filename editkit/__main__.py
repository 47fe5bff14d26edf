"""``python -m editkit ...``: the same command line as the ``editkit`` console script."""

from __future__ import annotations

import sys

from editkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
