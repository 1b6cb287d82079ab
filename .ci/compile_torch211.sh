#!/usr/bin/env bash
# Compiles every csrc/ source against torch 2.11's headers at C++17, the oldest torch pyproject.toml
# admits (torch>=2.11) and the one on the GPU machine. torch 2.11's cpp_extension compiles at
# C++17, torch >= 2.14 at C++20, so a C++20-only name in csrc/ builds with CI's torch 2.14 and
# fails on the GPU machine (std::type_identity in replay_buffer_impl.cuh did: this check fails on
# that commit with `namespace "std" has no member "type_identity"`).
#
# Flags: setup.py's compile_settings() (its include dirs, incl. the cuBLAS/cuSPARSE headers of the
# installed torch's nvidia-* wheels, its defines), the defines torch's BuildExtension adds, torch
# 2.11's COMMON_NVCC_FLAGS, sm_90. What it skips, to be cheap: optimisation (-O0 everywhere) and
# object code of the host side (.cu: nvcc runs cudafe++, cicc and ptxas for sm_90, then the host
# compiler with -fsyntax-only; .cpp: g++ -fsyntax-only). Two compiles at a time, .cu files first.
#
# torch 2.11's headers (62 MB) are cached outside the clone, in
# ${XDG_CACHE_HOME:-$HOME/.cache}/dgl_fast/torch-2.11.0-include (the 530 MB wheel is fetched from
# PyPI once, unpacked and deleted).
# Cost on a 2-core machine like CI's (measured 2026-12-02): the download and unzip about 15 s once
# (cold cache); the 12 compiles 3 min 1 s while a pip build shared the cores (about 2 min alone,
# BUILD.md's figure for the same compiles).
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_OLD=2.11.0
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dgl_fast/torch-${TORCH_OLD}-include"
inc="$cache/torch/include"
if [ ! -f "$cache/.complete" ]; then
  rm -rf "$cache" && mkdir -p "$cache"
  dl=$(mktemp -d "${cache%/*}/wheel.XXXXXX")
  pip download --quiet --no-deps --no-cache-dir --only-binary=:all: "torch==${TORCH_OLD}" -d "$dl"
  unzip -q "$dl"/torch-"${TORCH_OLD}"-*.whl 'torch/include/*' -d "$cache"
  rm -rf "$dl"
  touch "$cache/.complete"
fi

nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
[ -x "$nvcc" ] || nvcc=$(command -v nvcc)
cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")

jobs=$(mktemp -d)
trap 'rm -rf "$jobs"' EXIT
# One script per source, $jobs/NN.sh (.cu first: they take longest), from setup.py's settings at C++17.
python - "$inc" "$nvcc" "$cuda_root" "$jobs" <<'EOF'
import os, runpy, shlex, sys, sysconfig
inc, nvcc, cuda_root, jobs = sys.argv[1:]
s = runpy.run_path("setup.py", run_name="dgl_fast_setup")
cs = s["compile_settings"](use_cuda=True, std="c++17")
# torch's own include dirs (cpp_extension.include_paths("cuda")) and the Python headers, then ours
incs = [inc, f"{inc}/torch/csrc/api/include", f"{cuda_root}/include", sysconfig.get_paths()["include"]]
incs += cs["include_dirs"]
# the defines BuildExtension adds, then ours
defs = ["TORCH_API_INCLUDE_EXTENSION_H", "TORCH_EXTENSION_NAME=_C", "_GLIBCXX_USE_CXX11_ABI=1"]
defs += [f"{k}={v}" for k, v in cs["define_macros"]]
common = [f"-I{d}" for d in incs] + [f"-D{d}" for d in defs]


def no_opt(flags):
    return [f for f in flags if f not in ("-O3", "-g", "-lineinfo")]


nvcc_common = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
cmds = []
for src in [s for s in cs["sources"] if s.endswith(".cu")]:
    cmds.append((src, [nvcc] + no_opt(cs["nvcc"]) + nvcc_common + common + [
        "-O0", "-Xcicc", "-O0", "-Xptxas", "-O0", "-gencode", "arch=compute_90,code=sm_90",
        "--compiler-options", "-fPIC", "-Xcompiler", "-fsyntax-only", "-c", src, "-o", "/dev/null"]))
for src in [s for s in cs["sources"] if not s.endswith(".cu")]:
    cmds.append((src, ["g++"] + no_opt(cs["cxx"]) + ["-fPIC", "-fsyntax-only"] + common + [src]))
for i, (src, cmd) in enumerate(cmds):
    assert "-std=c++17" in cmd and "-fsyntax-only" in cmd
    log = os.path.join(jobs, f"{i:02d}.log")
    with open(os.path.join(jobs, f"{i:02d}.sh"), "w") as f:
        f.write(f"if {shlex.join(cmd)} > {log} 2>&1; then echo 'torch-2.11 c++17 ok: {src}'\n"
                f"else echo 'torch-2.11 c++17 FAILED: {src}'; grep -m 10 -E \"error|Error\" {log} || tail -n 20 {log}; exit 1; fi\n")
EOF

n=$(ls "$jobs"/*.sh | wc -l)
if ! ls "$jobs"/*.sh | xargs -P 2 -n 1 bash; then
  echo "compile_torch211: a csrc/ source does not compile against torch ${TORCH_OLD}'s headers at C++17" >&2
  exit 1
fi
echo "compile_torch211: all $n csrc/ sources compile against torch ${TORCH_OLD}'s headers at C++17"
