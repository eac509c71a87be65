#!/usr/bin/env bash
# Regenerates the Python stubs in strata_proto/ from proto/strata_proto/*.proto.
# Reproducible: the output depends only on the .proto files and the pinned grpcio-tools version
# (see pyproject.toml); tests/unit/test_proto_stubs.py checks the committed stubs are current.
# Usage: scripts/gen_proto.sh [OUT_DIR]   (default: the repository root)
set -euo pipefail
out="$(realpath -m "${1:-$(dirname "$0")/..}")"
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  proto/strata_proto/*.proto
touch "$out/strata_proto/__init__.py" "$out/strata_proto/py.typed"
