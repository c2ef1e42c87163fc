#!/usr/bin/env bash
# The newcomer's first command: install, then run a primary and two tiers of
# mirrors on this machine over a real local sshd (127.0.0.1, a free high port),
# all under ./demo (removed and recreated on each run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
