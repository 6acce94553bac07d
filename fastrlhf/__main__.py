"""``python -m fastrlhf``: the same command line as ``fastrlhf`` (see :mod:`fastrlhf.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
