#!/usr/bin/env bash
# Build llama.cpp's llama-server (plus llama-bench and llama-batched-bench, for
# bench/ceilings.py) from the llama.cpp sources vendored in the pinned llama-cpp-python sdist,
# so the anchor runs the same llama.cpp as Pensieve's bindings. CPU only, Release, no curl,
# static. Idempotent: does nothing when all three binaries already exist.
#
#   bash bench/build_llama_server.sh          # JOBS=2 by default
#
# Environment: LCP_VERSION (0.3.36), JOBS (2), SDIST_CACHE (/tmp/sdist, looked in first).
set -euo pipefail

LCP_VERSION="${LCP_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
SDIST_CACHE="${SDIST_CACHE:-/tmp/sdist}"
BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD_ROOT="${BENCH_DIR}/.build"
SDIST_NAME="llama_cpp_python-${LCP_VERSION}"
SRC_DIR="${BUILD_ROOT}/${SDIST_NAME}/vendor/llama.cpp"
CMAKE_DIR="${BUILD_ROOT}/cmake"
TARGETS=(llama-server llama-bench llama-batched-bench)
PYTHON="${PYTHON:-python3}"

log() { echo "[build_llama_server] $*" >&2; }

all_built() {
  local target
  for target in "${TARGETS[@]}"; do
    [[ -x "${CMAKE_DIR}/bin/${target}" ]] || return 1
  done
}

find_sdist() {
  local dir
  for dir in "${SDIST_CACHE}" "${BUILD_ROOT}/sdist"; do
    if [[ -f "${dir}/${SDIST_NAME}.tar.gz" ]]; then
      echo "${dir}/${SDIST_NAME}.tar.gz"
      return 0
    fi
  done
  return 1
}

fetch_sdist() {
  local sdist
  if sdist="$(find_sdist)"; then
    echo "${sdist}"
    return 0
  fi
  log "downloading the llama-cpp-python==${LCP_VERSION} sdist"
  mkdir -p "${BUILD_ROOT}/sdist"
  "${PYTHON}" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==${LCP_VERSION}" -d "${BUILD_ROOT}/sdist" >&2
  find_sdist
}

extract_sources() {
  [[ -f "${SRC_DIR}/CMakeLists.txt" ]] && return 0
  local sdist
  sdist="$(fetch_sdist)"
  log "extracting ${sdist}"
  tar -xzf "${sdist}" -C "${BUILD_ROOT}"
}

# The same ISA as Pensieve's own build (Makefile LLAMA_CFLAGS): on x86-64 no AMX, which some
# virtual machines advertise but fault on (SIGILL in the first matrix multiply).
NO_AMX_FLAGS=""
[[ "$(uname -m)" == "x86_64" ]] && NO_AMX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
LLAMA_CFLAGS="${LLAMA_CFLAGS-${NO_AMX_FLAGS}}"

configure() {
  local generator=()
  command -v ninja >/dev/null && generator=(-G Ninja)
  log "configuring ${SRC_DIR}"
  cmake -S "${SRC_DIR}" -B "${CMAKE_DIR}" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="${LLAMA_CFLAGS}" -DCMAKE_CXX_FLAGS="${LLAMA_CFLAGS}" \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF >&2
}

main() {
  if all_built; then
    log "already built: ${CMAKE_DIR}/bin/{${TARGETS[*]}}"
    exit 0
  fi
  command -v cmake >/dev/null || { log "cmake not found (apt-get install cmake ninja-build g++)"; exit 1; }
  mkdir -p "${BUILD_ROOT}"
  extract_sources
  [[ -f "${CMAKE_DIR}/CMakeCache.txt" ]] || configure
  log "building ${TARGETS[*]} with -j${JOBS}"
  cmake --build "${CMAKE_DIR}" --target "${TARGETS[@]}" -j "${JOBS}" >&2
  "${CMAKE_DIR}/bin/llama-server" --version >&2 || true
  log "done: ${CMAKE_DIR}/bin/llama-server"
}

main "$@"
