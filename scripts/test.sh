#!/usr/bin/env bash
# The test command: set up (idempotent), lint, type-check, then the whole pytest suite.
#   scripts/test.sh [pytest args...]        e.g. scripts/test.sh -k differential -x
#   scripts/test.sh -m soak                 the soak run, deselected by default (pyproject addopts)
# Run as root: the e2e tests start private containerds (pytest re-executes itself in a private
# mount namespace, see conftest.py). Exits non-zero if any step fails, including when pytest
# collects no tests at all (its exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { echo; echo "=== $* ==="; }

step "setup"
scripts/setup.sh

step "ruff check ."
.venv/bin/ruff check .

step "mypy podshim"
.venv/bin/mypy podshim

step "pytest -ra $*"
rc=0
.venv/bin/pytest -ra "$@" || rc=$?
if [ $rc -eq 5 ]; then
  echo "test.sh: pytest collected no tests (exit code 5): treating that as a failure" >&2
fi
exit $rc
