#!/usr/bin/env bash
# Create bench/.venv-lcp (a plain venv) holding llama-cpp-python's server and the harness's
# packages, pinned in bench/requirements-lcp.txt. Idempotent.
set -euo pipefail
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${BENCH_DIR}/.venv-lcp"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "${VENV}/bin/python" ]]; then
  "${PYTHON}" -m venv "${VENV}"
fi
# Building llama-cpp-python from source takes several minutes on 2 cores; pip reuses a cached
# wheel when the main venv already built the same version.
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
  "${VENV}/bin/pip" install --quiet -r "${BENCH_DIR}/requirements-lcp.txt"
"${VENV}/bin/python" -c "import llama_cpp, httpx; print('llama_cpp', llama_cpp.__version__, 'httpx', httpx.__version__)"
