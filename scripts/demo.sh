#!/usr/bin/env bash
# The demo command: set the machine up (idempotent), then run a pod under a private containerd.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec scripts/in-private-run.sh .venv/bin/python demo/demo.py "$@"
