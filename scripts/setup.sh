#!/usr/bin/env bash
# Set up a Debian 12 (bookworm) machine for podshim development and tests, as root. Idempotent:
# a second run installs nothing and takes a second or two.
#   1. Debian packages: containerd, runc, busybox-static (the e2e test image is built from it),
#      CNI plugins, iproute2, util-linux (unshare/mount for the tests' private mount namespace),
#      gcc + libc6-dev (the C entry point), python3-venv.
#   2. .venv with `pip install -e '.[dev]'` (the pins live in pyproject.toml); redone only when
#      pyproject.toml changes.
#
# containerd: the tests never use a system containerd, they start private ones. Debian's package
# ships only a systemd unit (no init script), so on a machine without systemd (no
# /run/systemd/system) installing it starts nothing. On a systemd machine its postinst enables and
# starts containerd.service; if this script is what installed the package, it stops and disables
# that service again, so setup leaves no daemon behind. An already-installed containerd is left alone.
#
# env: PYTHON (python3) = interpreter for the venv; must be 3.11.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-python3}
log() { echo "[setup $(date +%T)] $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh: run as root (apt-get, and the e2e tests need root too)" >&2
  exit 1
fi

# --- 1. Debian packages -------------------------------------------------------------------------
PACKAGES=(containerd runc crun busybox-static containernetworking-plugins iproute2 util-linux gcc libc6-dev
          python3 python3-venv qemu-system-x86)
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
missing=()
for p in "${PACKAGES[@]}"; do installed "$p" || missing+=("$p"); done

if [ ${#missing[@]} -gt 0 ]; then
  had_containerd=0; installed containerd && had_containerd=1
  systemd=0; [ -d /run/systemd/system ] && systemd=1
  was_active=0
  if [ $systemd = 1 ] && systemctl is-active --quiet containerd.service 2>/dev/null; then was_active=1; fi

  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

  if [ $had_containerd = 0 ] && [ $systemd = 1 ] && [ $was_active = 0 ]; then
    log "stopping and disabling the containerd.service that the package just started"
    systemctl stop containerd.service >/dev/null 2>&1 || true
    systemctl disable containerd.service >/dev/null 2>&1 || true
  fi
else
  log "Debian packages present"
fi

for b in containerd ctr runc containerd-shim-runc-v2 unshare mount; do
  command -v "$b" >/dev/null || { echo "setup.sh: $b not found after install" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "setup.sh: /bin/busybox missing (busybox-static)" >&2; exit 1; }

# --- 2. Python venv -----------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
  echo "setup.sh: $PYTHON is not Python 3.11 (set PYTHON=...)" >&2
  exit 1
fi
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "recreating .venv (wrong or broken interpreter)"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.podshim-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x .venv/bin/containerd-shim-podshim-v1-py ]; then
  log "pip install -e '.[dev]'"
  # compat mode: a plain path in a .pth, not an import hook; every shim start pays for the hook.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$REPO[dev]" --config-settings editable_mode=compat
  echo "$want" > "$stamp"
else
  log ".venv up to date"
fi

# The entry point containerd runs: a small C program (podshim/shim/entry.c) that hands each action
# to this containerd's warm zygote and falls back to the Python entry point, which it finds as
# podshim-cold/containerd-shim-podshim-v1 (a link to pip's containerd-shim-podshim-v1-py, so that
# ps shows the same name either way). Without gcc pip's Python script stays under the name
# containerd runs: everything works, cold. Replaced only when the build differs: a new binary is a
# new zygote key, which retires the running zygotes.
mkdir -p .venv/bin/podshim-cold
ln -sfn ../containerd-shim-podshim-v1-py .venv/bin/podshim-cold/containerd-shim-podshim-v1
if command -v gcc >/dev/null; then
  gcc -O2 -Wall -Werror -o .venv/.entry.new podshim/shim/entry.c
  if cmp -s .venv/.entry.new .venv/bin/containerd-shim-podshim-v1; then
    rm .venv/.entry.new
  else
    log "installing the C entry point .venv/bin/containerd-shim-podshim-v1"
    mv .venv/.entry.new .venv/bin/containerd-shim-podshim-v1
  fi
else
  log "no gcc: the shim's entry point is the Python one (no warm zygote)"
fi

# Bytecode for the shim's modules, written now: containerd may run the shim with
# PYTHONDONTWRITEBYTECODE set (it passes its environment on), and recompiling on every start of
# every shim costs about 30 ms.
.venv/bin/python -m compileall -q podshim

# --- 3. CRI client stubs for tests/cri (from Debian's containerd source package; cached) ----------
scripts/gen-cri-stubs.sh

# --- 4. Pod VM image (vm isolation): Debian's kernel + our initramfs, cached, idempotent ----------
.venv/bin/podshim vm-image

log "done"
