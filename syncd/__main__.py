"""``python -m syncd``: the same as the ``syncd`` console script."""

from .cli import entry

entry()
