"""The SIMT emulator's slow single-core work, started early in the background.

Building the emulator (tests/simt/simt_ops.cpp, about a minute) and the whole run of test_simt.py
under AddressSanitizer (its own build, then the op tests: about three minutes) each keep one core
busy while the rest of the suite mostly uses the other. When a session collects test_simt.py,
tests/conftest.py starts them at once in background processes (output in build/<name>.log), and
test_simt.py waits for them where it needs them: the fixture's build finds the module built, and
test_kernels_under_address_sanitizer reads the sanitizer run's result. Nothing is timed: a result
is waited for (with a bound), and a session that ends first kills what is still running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASAN_ENV = "DGL_FAST_SIMT_ASAN"
_started: dict[str, tuple[subprocess.Popen, Path]] = {}


def build(asan: bool):
    """Builds (or loads, when built) the emulator; registers torch.ops.dgl_fast_simt."""
    from torch.utils.cpp_extension import load  # noqa: PLC0415

    name = "dgl_fast_simt_asan" if asan else "dgl_fast_simt"
    cflags, ldflags = ["-O2", "-Wno-unknown-pragmas"], []
    if asan:
        cflags = ["-O1", "-g1", "-fsanitize=address", "-fno-omit-frame-pointer", "-Wno-unknown-pragmas"]
        ldflags = ["-fsanitize=address"]
    directory = ROOT / "build" / name
    directory.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    load(name=name, sources=[str(ROOT / "tests" / "simt" / "simt_ops.cpp")], extra_include_paths=[str(ROOT / "csrc")],
         extra_cflags=cflags, extra_ldflags=ldflags, build_directory=str(directory), is_python_module=False,
         verbose=False)


def gcc_runtime(name: str) -> str | None:
    try:
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return path if os.path.isabs(path) and os.path.exists(path) else None


def asan_command() -> tuple[list[str], dict] | None:
    """The run of test_simt.py under AddressSanitizer (None where gcc's libasan is missing). The
    whole-trainer runs are left out: they call the kernels the op tests already cover."""
    libs = [gcc_runtime("libasan.so"), gcc_runtime("libstdc++.so.6")]
    if None in libs:
        return None
    # libstdc++ is preloaded too, or ASan cannot intercept the exceptions the emulator throws.
    env = dict(os.environ, LD_PRELOAD=" ".join(libs), ASAN_OPTIONS="detect_leaks=0", **{ASAN_ENV: "1"})
    argv = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_simt.py"),
            "-k", "not training_through_the_cuda_code"]
    return argv, env


def start(name: str, argv: list[str], env: dict | None = None) -> None:
    if name in _started:
        return
    log = ROOT / "build" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    _started[name] = (proc, log)


def start_for(nodeids: list[str]) -> None:
    """Called with the session's collected test ids (not inside the sanitizer run itself)."""
    if os.environ.get(ASAN_ENV) == "1" or os.environ.get("DGL_FAST_SIMT_BACKGROUND") == "0":
        return
    simt = [n for n in nodeids if n.split("::")[0].endswith("test_simt.py")]
    if any("test_kernels_under_address_sanitizer" in n for n in simt) and (cmd := asan_command()):
        start("simt-asan", *cmd)
    if any("test_kernels_under_address_sanitizer" not in n for n in simt):
        start("simt-build", [sys.executable, __file__])


def result(name: str, timeout: float) -> tuple[int, str] | None:
    """``(returncode, output)`` of a started process, waited for up to ``timeout`` s; None if it was
    not started in this session."""
    if name not in _started:
        return None
    proc, log = _started[name]
    proc.wait(timeout=timeout)
    return proc.returncode, log.read_text(errors="replace")


def stop_all() -> None:
    for proc, _ in _started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    build(asan=False)
