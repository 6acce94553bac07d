"""``python -m fastrlhf.bench``: the same command line as ``fastrlhf bench``."""

import sys

from fastrlhf.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
