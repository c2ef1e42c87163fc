#!/usr/bin/env bash
# Installs what syncd and its tests need on a fresh Debian/Ubuntu machine:
# OpenSSH (client and server, for the real-sshd tests and the demo), GnuPG,
# rsync and rdiff (the tools the benchmarks compare with), then a virtualenv
# in .venv with syncd and its test extras.  Idempotent; apt steps need root.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="openssh-server openssh-client gnupg rsync rdiff procps python3-venv"
missing=""
for pkg in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup.sh: missing packages:$missing (run as root, or install them first)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Installing openssh-server must not start a system sshd here: the tests
    # and the demo run their own on a free high port of 127.0.0.1.
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import syncd, paramiko, sqlalchemy, numpy, gnupg, zstandard" \
    || { echo "setup.sh: the virtualenv in .venv is incomplete" >&2; exit 1; }
