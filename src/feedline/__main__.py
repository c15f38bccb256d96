"""``python -m feedline``: the same CLI as the ``feedline`` command."""

import sys

from feedline.cli import main

# Guarded so that importing this module (e.g. by documentation tools) does not run the CLI.
if __name__ == "__main__":
    sys.exit(main())
