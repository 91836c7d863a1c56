"""``python -m bertfast``: the same command line as the ``bertfast`` script."""
import sys

from bertfast.cli import main

if __name__ == "__main__":
    sys.exit(main())
