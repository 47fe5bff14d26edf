"""``python -m editkit.cli ...`` (as before the CLI became a package); same as ``python -m editkit``."""

from __future__ import annotations

import sys

from editkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
