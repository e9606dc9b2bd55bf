#!/usr/bin/env bash
# Every GPU figure in one go (see benchmarks/gpu.py): `bash benchmarks/gpu.sh [--dry-run]`.
# On a bare machine: `make venv` first, then this script.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make venv
exec .venv/bin/python benchmarks/gpu.py "$@"
