#!/usr/bin/env bash
# The test suite, as CI runs it: set up (apt packages, .venv), then pytest;
# then the transport tests again on the lowest paramiko pyproject.toml
# allows (scripts/test_paramiko_low.sh), as .venv holds the highest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
scripts/test_paramiko_low.sh
