"""syncd: incremental mirror synchronization daemon."""

__version__ = "0.1.0"
