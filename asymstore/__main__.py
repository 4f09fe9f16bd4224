"""``python -m asymstore``: the command-line interface (see :mod:`asymstore.cli`)."""

import sys

from .cli import main

sys.exit(main())
