#!/usr/bin/env bash
# Run a command in a private mount namespace whose /run is an empty temp dir, so that the paths
# containerd 1.6, its runc shim and ctr hard-code under /run/containerd never touch the host's.
# (pytest does the same on its own: see conftest.py.)   usage: scripts/in-private-run.sh CMD [ARGS...]
set -euo pipefail
if [ "${PODSHIM_TEST_NS:-}" = 1 ] && [ -n "${PODSHIM_TEST_RUN_DIR:-}" ]; then
  exec "$@"
fi
run_dir=$(mktemp -d /tmp/podshim-run-XXXXXX)
trap 'rm -rf "$run_dir"' EXIT
PODSHIM_TEST_NS=1 PODSHIM_TEST_RUN_DIR=$run_dir unshare --mount --propagation private -- \
  bash -c 'mount --bind "$PODSHIM_TEST_RUN_DIR" /run && exec "$@"' bash "$@"
