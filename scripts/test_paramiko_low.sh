#!/usr/bin/env bash
# The transport tests again, on the lowest paramiko that pyproject.toml
# allows (.venv, set up on a fresh machine, holds the highest): a second,
# small virtualenv in .venv-paramiko-low with that paramiko and the test
# extras only, which is all tests/test_transport.py and tests/test_gcm.py
# import.  syncd is not installed there: `python -m pytest` run from the
# checkout imports it from the checkout.  Idempotent; called by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-paramiko-low
PYTHON=${PYTHON:-python3}
# The pins come from pyproject.toml: paramiko at the floor of its range, and
# the test extras.
mapfile -t requirements < <(.venv/bin/python - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
(floor,) = [m.group(1) for d in project["dependencies"] if (m := re.fullmatch(r"paramiko>=([0-9.]+),.*", d))]
print(f"paramiko=={floor}")
print(*project["optional-dependencies"]["test"], sep="\n")
PY
)
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import paramiko, pytest, hypothesis; print('paramiko', paramiko.__version__)" \
    || { echo "test_paramiko_low.sh: the virtualenv in $VENV is incomplete" >&2; exit 1; }
exec "$VENV/bin/python" -m pytest -q tests/test_transport.py tests/test_gcm.py
