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
    for sub, key in (("cpu", "CPU"), ("cuda", "CUDA")):
        for f in os.listdir(os.path.join(csrc, sub)):
            assert f"TORCH_LIBRARY_IMPL(dgl_fast, {key}," in _read("csrc", sub, f)
