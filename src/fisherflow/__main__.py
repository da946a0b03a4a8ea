"""``python -m fisherflow``: the ``fisherflow`` command."""

import sys

from fisherflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
