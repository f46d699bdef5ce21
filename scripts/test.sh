#!/usr/bin/env bash
# Set up (quick when already done) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (pytest-xdist); the slow tests start first and an idle worker takes tests from a busy one
exec .venv/bin/python -m pytest -q -n auto --dist worksteal "$@"
