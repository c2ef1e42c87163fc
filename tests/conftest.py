"""Shared pytest configuration."""

import os

from hypothesis import settings

# CI machines are small and shared: keep property tests deterministic in count,
# free of wall-clock deadlines (a loaded core must not fail a correct test).
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
