#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the llama.cpp that llama-cpp-python 0.3.36
# vendors (its source distribution on PyPI), with the same flags as axfs's build, for
# the remote driver's tests (tests/test_remote_driver.py) and the benchmarks that run it:
#
#   bash tools/build-llama-server.sh            # prints the binary's path at the end
#   LLAMA_SERVER=$(bash tools/build-llama-server.sh | tail -1) \
#     .venv/bin/python tools/bench/throughput --baseline llama-server
#
# A no-op when the binary exists. About five minutes on two cores. Needs cmake and a C++
# compiler (tools/install.sh installs them, then runs this).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/build/llama-server"
bin="$out/build/bin/llama-server"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$out"
cd "$out"
if [ ! -d src ]; then
  "$repo/.venv/bin/python" -m pip download -q --no-deps --no-binary :all: \
    llama-cpp-python==0.3.36 -d sdist >&2
  mkdir src && tar -xzf sdist/llama_cpp_python-0.3.36.tar.gz -C src --strip-components=1
fi
# LLAMA_USE_PREBUILT_UI defaults to ON and would try to download a web UI.
cmake -S src/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >&2
cmake --build build --target llama-server -j"$(nproc)" >&2
echo "$bin"
