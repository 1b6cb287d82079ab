"""The README's test command is the one CI runs, and the layout the README promises exists."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [ln for ln in _read(".ci", "run").splitlines() if "pytest" in ln and not ln.startswith("#")]
    assert len(ci_lines) == 1
    assert ci_lines[0].strip() in _read("README.md")


def test_one_schema_file_and_kernels_per_device():
    csrc = os.path.join(ROOT, "csrc")
    schema_files = [f for f in os.listdir(csrc) if f.endswith(".cpp") and "TORCH_LIBRARY(" in _read("csrc", f)]
    assert schema_files == ["dgl_fast.cpp"]
    for sub, key, ext in (("cpu", "CPU", ".cpp"), ("cuda", "CUDA", ".cu")):
        for f in os.listdir(os.path.join(csrc, sub)):
            if f.endswith(ext):
                assert f"TORCH_LIBRARY_IMPL(dgl_fast, {key}," in _read("csrc", sub, f)


def test_cuda_code_is_shared_with_the_emulator():
    """Every CUDA op keeps its kernels in a .cuh that tests/simt compiles too, and launches only
    through the launcher (no <<<...>>> outside csrc/cuda/launch.cuh)."""
    cuda = os.path.join(ROOT, "csrc", "cuda")
    emulated = _read("tests", "simt", "simt_ops.cpp")
    for f in sorted(os.listdir(cuda)):
        text = _read("csrc", "cuda", f)
        if f.endswith(".cu"):
            header = f[:-3] + ".cuh"
            assert f'#include "{header}"' in text and "<<<" not in text and "__global__" not in text, f
            assert f'#include "cuda/{header}"' in emulated, f"{header} is not run by tests/simt"
        elif f != "launch.cuh":
            assert "<<<" not in text and "c10/cuda" not in text, f
