#!/bin/bash
# Generate the Python CRI v1 client stubs the CRI end-to-end tests (tests/cri) use.
#
# The CRI API's api.proto ships in Debian's containerd *source* package
# (vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto).  It is fetched with a private apt
# configuration (deb-src entries derived from the machine's own debian.sources; the system's
# apt lists and config are not touched), only that one file is extracted, its gogoproto lines
# (Go-only codegen hints) are dropped, and grpcio-tools' protoc generates
#     build/cri/py/k8s_cri/runtime/v1/api_pb2.py, api_pb2.pyi, api_pb2_grpc.py
# build/ is git-ignored: neither the proto nor the stubs are committed.
#
# Idempotent and cached: a second run does nothing unless the installed containerd, grpcio-tools
# or this script changed, and only a new containerd version fetches again.  The first run needs
# root (apt-get), the Debian mirror and xz (the .orig tarball is .tar.xz); the apt lists and the
# tarball are deleted afterwards (~20 MB).  Env: PYTHON (default .venv/bin/python), CRI_BUILD_DIR.
set -euo pipefail
SELF=$(readlink -f "$0")
cd "$(dirname "$SELF")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(realpath -m "${CRI_BUILD_DIR:-build/cri}")
PROTO_REL=vendor/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto
PKG=k8s_cri   # unique top-level package name, so "runtime" never shadows anything on sys.path
log() { echo "[gen-cri-stubs] $*" >&2; }

# The version of containerd's source package to take the proto from: the installed one if any.
want=$(dpkg-query -W -f='${source:Version}' containerd 2>/dev/null || true)
tools=$("$PY" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))')
stamp="containerd=${want:-candidate} grpcio-tools=$tools script=$(sha256sum "$SELF" | cut -c1-12)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/py/$PKG/runtime/v1/api_pb2_grpc.py" ]; then
  exit 0
fi

proto="$OUT/proto/$PKG/runtime/v1/api.proto"
if [ ! -f "$OUT/api.proto.orig" ] || [ ! -f "$OUT/src/.version" ] || [ "$(cat "$OUT/src/.version")" != "${want:-candidate}" ]; then
  # deb-src entries derived from the machine's own apt sources (no mirror named here)
  src_list=/etc/apt/sources.list.d/debian.sources
  [ -f "$src_list" ] || { log "missing $src_list (expected on Debian 12)"; exit 1; }
  mkdir -p "$OUT/apt/parts" "$OUT/apt/lists/partial" "$OUT/apt/cache/archives/partial"
  sed -e 's/^Types: deb$/Types: deb-src/' "$src_list" > "$OUT/apt/parts/src.sources"
  APTO=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$OUT/apt/parts"
        -o Dir::State::Lists="$OUT/apt/lists" -o Dir::Cache="$OUT/apt/cache"
        -o APT::Sandbox::User=root)
  log "apt-get update (private deb-src lists under $OUT/apt)"
  apt-get "${APTO[@]}" update -qq
  rm -rf "$OUT/src" && mkdir -p "$OUT/src"
  log "apt-get source --download-only containerd${want:+=$want}"
  (cd "$OUT/src" && { { [ -n "$want" ] && apt-get "${APTO[@]}" source --download-only "containerd=$want" >/dev/null 2>&1; } \
     || apt-get "${APTO[@]}" source --download-only containerd >/dev/null; })
  found=""
  for t in "$OUT"/src/containerd_*.tar.*; do
    case "$t" in *.asc) continue ;; esac
    member=$(tar -tf "$t" | grep -m1 -E "^[^/]+/$PROTO_REL\$|^$PROTO_REL\$" || true)
    if [ -n "$member" ]; then
      tar -xOf "$t" "$member" > "$OUT/api.proto.orig.tmp"
      mv "$OUT/api.proto.orig.tmp" "$OUT/api.proto.orig"
      found=$t
      break
    fi
  done
  [ -n "$found" ] || { log "no $PROTO_REL in $(ls "$OUT"/src)"; exit 1; }
  log "extracted $PROTO_REL from $(basename "$found")"
  echo "${want:-candidate}" > "$OUT/src/.version"
  # Keep only the small .dsc: the tarballs and the private apt lists (~20 MB) are not needed any more.
  rm -rf "$OUT"/src/containerd_*.tar.* "$OUT/apt"
fi

mkdir -p "$(dirname "$proto")"
# drop the gogoproto import/options (Go-only codegen hints)
sed -e '/gogoproto/d' "$OUT/api.proto.orig" > "$proto"
rm -rf "$OUT/py.tmp" && mkdir -p "$OUT/py.tmp"
"$PY" -m grpc_tools.protoc -I "$OUT/proto" --python_out="$OUT/py.tmp" --pyi_out="$OUT/py.tmp" \
   --grpc_python_out="$OUT/py.tmp" "$proto"
# Generated code is not held to the project's strict mypy settings (its types are still used).
for f in "$OUT"/py.tmp/$PKG/runtime/v1/api_pb2*.py*; do sed -i '1i # mypy: ignore-errors' "$f"; done
rm -rf "$OUT/py" && mv "$OUT/py.tmp" "$OUT/py"
echo "$stamp" > "$OUT/stamp"
log "generated $OUT/py/$PKG/runtime/v1/{api_pb2.py,api_pb2.pyi,api_pb2_grpc.py}"
