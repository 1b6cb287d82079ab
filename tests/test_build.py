"""The C++ standard of the build follows the installed torch's headers (setup.py's cxx_standard):
C++17 for torch 2.11 .. 2.13 (the GPU machine's torch compiles extensions at C++17), C++20 from
2.14, whose headers refuse C++17. `.ci/compile_torch211.sh` compiles every source at C++17
against torch 2.11's own headers."""

import os
import runpy

import torch

import dgl_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="dgl_fast_setup")


def _fake_torch_include(tmp_path, guard: str) -> str:
    d = tmp_path / "include" / "torch" / "csrc" / "api" / "include" / "torch"
    d.mkdir(parents=True)
    (d / "all.h").write_text(f"#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < {guard}\n#error C++ too old\n#endif\n")
    return str(tmp_path / "include")


def test_standard_read_from_the_headers_guard(tmp_path):
    std = SETUP["cxx_standard"]
    assert std(_fake_torch_include(tmp_path / "a", "201703L"), "2.11.0") == "c++17"
    assert std(_fake_torch_include(tmp_path / "b", "202002L"), "2.14.1") == "c++20"
    # the guard wins over the version; without headers, the version decides
    assert std(_fake_torch_include(tmp_path / "c", "201703L"), "2.14.1") == "c++17"
    assert std(str(tmp_path / "none"), "2.11.0+cu130") == "c++17"
    assert std(str(tmp_path / "none"), "2.14.1") == "c++20"


def test_this_build_used_the_installed_torchs_standard():
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    want = SETUP["cxx_standard"](include, torch.__version__)
    assert dgl_fast.build_config()["cxx_standard"] == want
    settings = SETUP["compile_settings"](use_cuda=True, std=want)
    assert f"-std={want}" in settings["cxx"] and f"-std={want}" in settings["nvcc"]
