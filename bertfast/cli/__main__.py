"""``python -m bertfast.cli``: the same command line as ``bertfast`` and ``python -m bertfast``."""
import sys

from bertfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
