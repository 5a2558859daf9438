#!/usr/bin/env bash
# Regenerate profile_pb2.py(i) from the official pprof profile.proto (Debian's
# golang-github-google-pprof-dev, installed by scripts/setup.sh) with the dev extras'
# grpcio-tools. The proto is compiled under its upstream import path so its descriptor
# ("github.com/google/pprof/proto/profile.proto", package perftools.profiles) cannot
# clash with another "profile.proto" in the process-wide descriptor pool.
# Usage (from the repo root): bash agent/pprof/proto/generate.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
src=/usr/share/gocode/src
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
.venv/bin/python -m grpc_tools.protoc -I"$src" --python_out="$out" --pyi_out="$out" \
  "$src/github.com/google/pprof/proto/profile.proto"
cp "$out/github/com/google/pprof/proto/profile_pb2.py" agent/pprof/proto/profile_pb2.py
cp "$out/github/com/google/pprof/proto/profile_pb2.pyi" agent/pprof/proto/profile_pb2.pyi
