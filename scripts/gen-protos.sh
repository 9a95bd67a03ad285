#!/bin/sh
# Regenerate podshim/api/*_pb2.py and *_pb2.pyi from the .proto files.
# Run from anywhere; output is byte-for-byte reproducible (fixed protoc from
# grpcio-tools, sorted inputs, paths relative to the repo root).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -f podshim/api/*_pb2.py podshim/api/*_pb2.pyi
# grpc_tools.protoc adds its bundled google/protobuf/*.proto include path itself.
# shellcheck disable=SC2046
"$PY" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
    $(LC_ALL=C ls podshim/api/*.proto)
