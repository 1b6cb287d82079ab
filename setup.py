"""Build dgl_fast and its native library `dgl_fast._C`.

Environment switches (read at build time, never whether a GPU is visible):

- ``DGL_FAST_CUDA=0|1``: force the CPU-only or the CUDA build. Default: CUDA when torch is a
  CUDA build and ``nvcc`` is found (``$CUDA_HOME/bin/nvcc``, ``/usr/local/cuda/bin/nvcc`` or PATH).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures to compile for (default ``9.0``, H100/H200).
- ``CUDA_HOME``: CUDA toolkit root; defaulted from the ``nvcc`` that was found.
- ``MAX_JOBS``: parallel compile jobs (ninja), as everywhere in torch.utils.cpp_extension.
- ``DGL_FAST_DEBUG=1``: ``-O0 -g`` host code and ``-G``-free device code with line info.

C++ standard: the one the installed torch's headers require, passed explicitly to both g++ and
nvcc (``cxx_standard()``): ``-std=c++17`` for torch 2.11 .. 2.13 (their ``torch/all.h`` demands C++17
and their cpp_extension passes ``-std=c++17``), ``-std=c++20`` for torch >= 2.14 (its headers refuse
C++17). So ``csrc/`` must stay C++17 code: CI compiles every source against torch 2.11's headers at
C++17 (``.ci/compile_torch211.sh``). CMakeLists.txt picks the same standard the same way.

``compile_settings()`` is the one place that lists include directories, defines and flags; the CI
check loads it with ``runpy.run_path("setup.py", run_name="dgl_fast_setup")`` (the build itself runs
only as ``__main__``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.realpath(path)
    return None


def _want_cuda(torch_cuda: str | None, nvcc: str | None) -> bool:
    env = os.environ.get("DGL_FAST_CUDA")
    if env not in (None, "", "0", "1"):
        raise SystemExit(f"DGL_FAST_CUDA must be 0 or 1, got {env!r}")
    if env == "0":
        return False
    if env == "1":
        if torch_cuda is None:
            raise SystemExit("DGL_FAST_CUDA=1 but the installed torch is a CPU-only build")
        if nvcc is None:
            raise SystemExit("DGL_FAST_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return True
    return torch_cuda is not None and nvcc is not None


def _nvidia_wheel_includes() -> list[str]:
    """Headers (cuBLAS, cuSPARSE, ...) shipped in the nvidia-* pip wheels torch depends on."""
    try:
        import nvidia  # noqa: PLC0415
    except ImportError:
        return []
    found = []
    for base in list(nvidia.__path__):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")) or os.path.isfile(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return found


def cxx_standard(torch_include: str, torch_version: str) -> str:
    """``"c++17"`` or ``"c++20"``: the standard torch's headers under `torch_include` require.

    Read from the ``__cplusplus < 2017xxL / 2020xxL`` guard in ``torch/csrc/api/include/torch/all.h``
    (C++17 up to torch 2.13, C++20 from 2.14); without that guard, from the version (>= 2.14: C++20).
    """
    header = os.path.join(torch_include, "torch", "csrc", "api", "include", "torch", "all.h")
    try:
        with open(header) as f:
            m = re.search(r"__cplusplus\s*<\s*(\d{4})\d\dL", f.read())
    except OSError:
        m = None
    if m:
        return "c++20" if int(m.group(1)) >= 2020 else "c++17"
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def compile_settings(use_cuda: bool, std: str, debug: bool = False) -> dict:
    """Sources, include dirs (besides torch's own), defines and flags of the `dgl_fast._C` build."""
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # Includes are written from csrc/ ("aux_pool.h", "cuda/aux_pool_impl.cuh"), never with "../".
    include_dirs = [os.path.join(ROOT, "csrc")]
    defines = []
    nvcc_flags = []
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _nvidia_wheel_includes()
        defines.append(("DGL_FAST_WITH_CUDA", "1"))
        nvcc_flags = [f"-std={std}"] + opt + ["-lineinfo", "--expt-relaxed-constexpr"]
    return {
        "sources": sources,
        "include_dirs": include_dirs,
        "define_macros": defines,
        "cxx": [f"-std={std}"] + opt + ["-Wall", "-Wno-unused-function"],
        "nvcc": nvcc_flags,
    }


def _extensions():
    import torch  # noqa: PLC0415

    nvcc = _find_nvcc()
    use_cuda = _want_cuda(torch.version.cuda, nvcc)
    if use_cuda:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: PLC0415

    debug = os.environ.get("DGL_FAST_DEBUG") == "1"
    std = cxx_standard(os.path.join(os.path.dirname(torch.__file__), "include"), torch.__version__)
    cs = compile_settings(use_cuda, std, debug)
    if use_cuda:
        ext = CUDAExtension(
            name="dgl_fast._C",
            sources=cs["sources"],
            include_dirs=cs["include_dirs"],
            define_macros=cs["define_macros"],
            extra_compile_args={"cxx": cs["cxx"], "nvcc": cs["nvcc"]},
        )
    else:
        ext = CppExtension(
            name="dgl_fast._C",
            sources=cs["sources"],
            include_dirs=cs["include_dirs"],
            extra_compile_args={"cxx": cs["cxx"]},
        )

    config = {
        "cuda": use_cuda,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if use_cuda else None,
        "built_with_torch": torch.__version__,
        "built_with_cuda": torch.version.cuda if use_cuda else None,
        "nvcc": nvcc if use_cuda else None,
        "debug": debug,
        "cxx_standard": std,
    }
    with open(os.path.join(ROOT, "dgl_fast", "_build_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # setuptools (pip, `python setup.py ...`) runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(
        packages=find_packages(include=["dgl_fast", "dgl_fast.*"]),
        package_data={"dgl_fast": ["_build_config.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
