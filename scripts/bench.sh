#!/usr/bin/env bash
# podshim's benchmarks beside containerd's runc shim (bench/README.md).
#   scripts/bench.sh [--smoke] [--only SCENARIO ...] [--iterations N] [--scale N ...] [--out DIR]
# Starts a private containerd (with CRI, in its own network namespace) inside a private mount
# namespace with a private /run, so neither the host's /run/containerd nor a system containerd is
# touched. Results: bench/results/latest.{md,json} and PNG charts. Needs root and scripts/setup.sh
# (whose dev extras include the bench's matplotlib and py-spy).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "bench.sh: run as root (containerd, runc, mounts, cgroups, netns)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || { echo "bench.sh: no .venv: run scripts/setup.sh first" >&2; exit 1; }
scripts/gen-cri-stubs.sh
exec scripts/in-private-run.sh .venv/bin/python -m bench "$@"
