"""``python -m syncd``: the same as the ``syncd`` console script."""

import sys

from .cli import main

sys.exit(main())
