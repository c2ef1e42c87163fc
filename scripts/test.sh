#!/usr/bin/env bash
# The test suite, as CI runs it: set up (apt packages, .venv), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
