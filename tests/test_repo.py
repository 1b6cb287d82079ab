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
    """Every CUDA op keeps its host implementation in cuda/<op>_impl.cuh (kernels in <op>_kernels.cuh)
    that tests/simt compiles too; <op>.cu only registers it; launches go only through the launcher
    (no <<<...>>> outside csrc/cuda/launch.cuh)."""
    cuda = os.path.join(ROOT, "csrc", "cuda")
    emulated = _read("tests", "simt", "simt_ops.cpp")
    for f in sorted(os.listdir(cuda)):
        text = _read("csrc", "cuda", f)
        if f.endswith(".cu"):
            impl = f"cuda/{f[:-3]}_impl.cuh"
            assert os.path.isfile(os.path.join(cuda, f"{f[:-3]}_kernels.cuh")), f
            assert f'#include "{impl}"' in text and "<<<" not in text and "__global__" not in text, f
            assert f'#include "{impl}"' in emulated, f"{impl} is not run by tests/simt"
        elif f != "launch.cuh":
            assert "<<<" not in text and "c10/cuda" not in text, f


def test_one_header_per_op_and_includes_from_csrc():
    """csrc/<op>.h, cpu/<op>.cpp and cuda/<op>.cu share one stem; no include climbs with ../."""
    csrc = os.path.join(ROOT, "csrc")
    stems = {f[:-2] for f in os.listdir(csrc) if f.endswith(".h")}
    assert stems == {f[:-4] for f in os.listdir(os.path.join(csrc, "cpu")) if f.endswith(".cpp")}
    assert stems == {f[:-3] for f in os.listdir(os.path.join(csrc, "cuda")) if f.endswith(".cu")}
    for dirpath, _, files in os.walk(csrc):
        for f in files:
            with open(os.path.join(dirpath, f)) as fh:
                assert '#include "../' not in fh.read(), os.path.join(dirpath, f)


def _package_modules():
    """{module name: source} of every module under dgl_fast/ (a package by its own name)."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, "dgl_fast")):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].replace(os.sep, ".")
                with open(os.path.join(dirpath, f)) as fh:
                    out[rel.removesuffix(".__init__")] = fh.read()
    return out


def _imports(name: str, source: str):
    """(imported module, imported names) of every import in ``source``, relative ones resolved."""
    import ast

    is_pkg = name in _PACKAGES
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


_PACKAGES = {"dgl_fast", "dgl_fast.schedules", "dgl_fast.bench"}


def test_architecture_rules():
    """Issue 11's rules: no module over about 400 lines, no import of another module's private
    name, no circle in the import graph of dgl_fast."""
    mods = _package_modules()
    assert {"dgl_fast.trainer", "dgl_fast.stage", "dgl_fast.config", "dgl_fast.schedules.base"} <= set(mods)
    for name, src in mods.items():
        assert src.count("\n") <= 420, f"{name} has {src.count(chr(10))} lines"
    graph = {}
    for name, src in mods.items():
        edges = set()
        for mod, names in _imports(name, src):
            if not mod.startswith("dgl_fast"):
                continue
            for n in names:
                # a private name of another module; the package's own private modules (_C, the
                # compiled library, and _native, which loads it) are modules, not names
                private_module = f"{mod}.{n}" in mods or (mod == "dgl_fast" and n == "_C")
                assert not n.startswith("_") or private_module, f"{name} imports private {mod}.{n}"
                if f"{mod}.{n}" in mods:  # `from . import ops` imports a module
                    edges.add(f"{mod}.{n}")
            if mod in mods and mod != name and not all(f"{mod}.{n}" in mods for n in names or ["*"]):
                edges.add(mod)  # (`from . import ops` depends on dgl_fast.ops, not on the package)
        graph[name] = edges
    # a package's __init__ re-exporting its own modules is not a circle through them
    for pkg in _PACKAGES:
        for child in list(graph.get(pkg, ())):
            graph[child] = {e for e in graph.get(child, ()) if e != pkg}
    state = {}

    def visit(n, path):
        state[n] = 1
        for m in graph.get(n, ()):
            assert state.get(m) != 1, f"import circle: {' -> '.join(path + [m])}"
            if m not in state:
                visit(m, path + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
