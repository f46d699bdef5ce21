#!/usr/bin/env bash
# Set up (quick when already done) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (pytest-xdist); each file's tests stay on one worker, the slow files start first
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
