#!/usr/bin/env bash
# Installs llama-cpp-python (the annotator's CPU backend) into the given Python's environment, built for this CPU.
#
# llama.cpp compiles with -march=native. Some virtual machines (these project machines among them) report AMX in
# cpuid yet fault on its instructions: ggml's AMX matmul dies with SIGILL on the first forward pass. Where the CPU
# claims AMX, the AMX code is compiled out (GCC's explicit -mno-amx-* win over what -march=native implies); every
# other native instruction set (AVX-512, VNNI, BF16) stays. The built wheel is kept in a wheelhouse named for that
# choice, outside pip's cache (which cannot tell build flags apart), so a fresh venv reuses it instead of compiling
# for six minutes again.
# Usage: scripts/install-llama-cpp.sh PYTHON VERSION_SPEC   e.g. scripts/install-llama-cpp.sh .venv/bin/python '==0.3.36'
set -euo pipefail
python=${1:?usage: install-llama-cpp.sh PYTHON VERSION_SPEC}
spec=${2:?usage: install-llama-cpp.sh PYTHON VERSION_SPEC}
variant=native
cmake_args=${CMAKE_ARGS:-}
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  variant=native-noamx
  # backslash-escaped spaces: the build backend splits CMAKE_ARGS like a shell
  flags='-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16'
  cmake_args="$cmake_args -DCMAKE_C_FLAGS=$flags -DCMAKE_CXX_FLAGS=$flags"
fi
wheelhouse="${XDG_CACHE_HOME:-$HOME/.cache}/embedkomb/wheelhouse/llama-cpp-python-$variant-$(uname -m)"
mkdir -p "$wheelhouse"
version=${spec#==}
if ! ls "$wheelhouse"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $version for this CPU ($variant; about 6 minutes on 2 cores) into $wheelhouse" >&2
  CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --quiet --no-deps --no-cache-dir -w "$wheelhouse" \
    "llama-cpp-python$spec"
fi
# --force-reinstall: a build from pip's cache (flags unknown) must not stay in place; its dependencies come with the project
"$python" -m pip install --quiet --force-reinstall --no-deps --no-index --find-links "$wheelhouse" "llama-cpp-python$spec"
