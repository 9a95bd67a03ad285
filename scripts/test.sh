#!/usr/bin/env bash
# The test command: set up (idempotent), lint, type-check, then the whole pytest suite.
#   scripts/test.sh [pytest args...]        e.g. scripts/test.sh -k differential -x
#   scripts/test.sh -m soak                 the soak run, deselected by default (pyproject addopts)
# Without arguments it also re-runs the differential tests with podshim's cold entry point.
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
[ $rc -eq 0 ] || exit $rc

# The suite above runs podshim through its C entry point and warm zygote (as setup.sh installs
# it). The differential tests run once more with the Python entry point alone: both must give
# runc-v2's results.
if [ $# -eq 0 ]; then
  step "pytest tests/e2e/test_differential.py -k podshim, cold entry point (PODSHIM_SHIM_MODE=cold)"
  PODSHIM_SHIM_MODE=cold .venv/bin/pytest -ra tests/e2e/test_differential.py -k podshim || rc=$?
fi
exit $rc
