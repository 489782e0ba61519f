#!/usr/bin/env bash
# Builds the FFI kernels into the source tree (dhjax/_kernels/, git-ignored) for working on dhjax
# without reinstalling: tests run against the tree (pytest's pythonpath is "."; tests/conftest.py
# refuses to run when an editable install of another checkout shadows it) and the loader
# looks in dhjax/_kernels first. Pass -DDHJAX_CUDA=ON to build the CUDA handlers too.
#   bash kernels/build_inplace.sh [-DDHJAX_CUDA=ON]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build/inplace -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python || command -v python3)" "$@" > /dev/null
cmake --build build/inplace -j "$(nproc)"
cmake --install build/inplace --prefix . > /dev/null
ls dhjax/_kernels
