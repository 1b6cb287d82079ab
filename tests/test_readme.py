"""The README's documented calls run: every Python example (at tiny sizes), every call signature
written in backticks resolves to a public name that accepts those arguments, and every option of
the command line it names is accepted. A renamed, removed or shadowed name fails here."""

from __future__ import annotations

import ast
import inspect
import os
import re
import sys

import pytest
import torch

import dgl_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()

# Tiny sizes for the examples: each replacement must match the README text (a changed example
# fails here rather than silently running at full size).
EXAMPLE_SIZES = {
    "width=64": "width=8",
    "epochs=5": "epochs=1",
    "torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))": "torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))",
}


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_has_examples_and_calls():
    assert _python_blocks(), "the README has no ```python example"
    assert len(_documented_calls()) >= 10


def test_every_example_size_is_used():
    for old in EXAMPLE_SIZES:  # a changed example fails here rather than running at full size
        assert any(old in code for code in _python_blocks()), f"no README example contains {old!r}: update EXAMPLE_SIZES"


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_python_example_runs(index, tmp_path, monkeypatch):
    code = _python_blocks()[index]
    for old, new in EXAMPLE_SIZES.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)  # files it writes (dgl.pt) land in a temporary folder
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(code, f"README.md python example {index + 1}", "exec"), namespace)  # noqa: S102
    if "trainer.save(" in code:  # the API example: what it promises about its results
        K = len(namespace["net"].stages)
        out = namespace["out"]
        assert out.losses.shape == (K,) and out.correct.shape == (K,)
        assert len(namespace["acc"]) == K and all(0.0 <= a <= 1.0 or 0.0 <= a <= 100.0 for a in namespace["acc"])
        assert os.path.isfile(tmp_path / "dgl.pt")
        assert namespace["logits"].shape == (namespace["x"].shape[0], 10)
    if "from_module(" in code:  # your own model: its classifier is the last head, the weights go back
        net, fresh, x = namespace["net"], namespace["fresh"], namespace["x"]
        if namespace["trainer"].channels_last:  # the trainer's layout (auto: on x86 CPUs), for bitwise outputs
            fresh = fresh.to(memory_format=torch.channels_last)
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x[:3]), net.eval()(x[:3]))
        assert isinstance(net.heads[-1], dgl_fast.LogitsHead) and len(namespace["acc"]) == net.num_stages == 4
        trained = namespace["model"].state_dict()  # the layers net trained are model's own
        assert fresh.state_dict().keys() == trained.keys()
        assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
        torch.manual_seed(0)  # the example's first draw: the model's initial weights
        initial = namespace["torchvision"].models.resnet18(num_classes=10).state_dict()
        assert not torch.equal(trained["conv1.weight"], initial["conv1.weight"])  # trained, and exported


# ----------------------------------------------------------------------------- call signatures

# receivers of method calls written in the README, and the classes they are instances of
def _receivers() -> dict:
    from dgl_fast.distributed import DistributedDGL
    from dgl_fast.memory import MemoryReport

    return {"buf": dgl_fast.ReplayBuffer, "trainer": dgl_fast.Trainer, "net": dgl_fast.DecoupledModel,
            "report": MemoryReport, "sample": dgl_fast.Sample, "DistributedDGL": DistributedDGL}


# calls of other libraries, or of formulas the README writes as math
_FOREIGN = ("F.", "torch.", "mlxtend.", "print(", "relu(", "nn.", "bool(")


def _documented_calls() -> list[str]:
    calls = re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*\([^`]*\))`", README)
    return sorted({c for c in calls if not c.startswith(_FOREIGN)})


def _resolve(name: str) -> list:
    """What a documented dotted name may mean: an attribute chain from dgl_fast, a method of the
    class a receiver (``buf.``, ``trainer.``) names, or, for a bare name, a method of one of the
    public classes or a function of one of dgl_fast's modules."""
    parts = name.split(".")
    receivers = _receivers()
    if parts[0] != "dgl_fast" and hasattr(dgl_fast, parts[0]):
        parts = ["dgl_fast", *parts]
    if parts[0] == "dgl_fast" or parts[0] in receivers:
        obj = dgl_fast if parts[0] == "dgl_fast" else receivers[parts[0]]
        for k, p in enumerate(parts[1:], 1):
            assert hasattr(obj, p), f"{'.'.join(parts[:k])} has no attribute {p!r} (README: {name})"
            obj = getattr(obj, p)
        return [obj]
    assert len(parts) == 1, f"README documents {name}(...): unknown receiver {parts[0]!r}"
    found = [getattr(c, name) for c in (*receivers.values(), dgl_fast.AuxHead) if hasattr(c, name)]
    found += [getattr(m, name) for k, m in sorted(sys.modules.items())
              if k.startswith("dgl_fast.") and m is not None and inspect.isfunction(getattr(m, name, None))
              and not name.startswith("_")]
    assert found, f"README documents {name}(...), which no public class or module of dgl_fast has"
    return found


def _binds(target, tree) -> str | None:
    """None when ``target`` accepts the call ``tree``'s arguments, else why not."""
    if not callable(target):
        return "not callable"
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # torch ops without a Python signature
        return None
    params = list(sig.parameters.values())
    if inspect.isfunction(target) and params and params[0].name == "self":  # a method of a class
        params = params[1:]
    names = {p.name for p in params}
    varkw = any(p.kind is p.VAR_KEYWORD for p in params)
    varpos = any(p.kind is p.VAR_POSITIONAL for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    n_pos = sum(not isinstance(a, ast.Starred) and not (isinstance(a, ast.Constant) and a.value is Ellipsis)
                for a in tree.args)
    if not varpos and n_pos > len(positional):
        return f"takes {len(positional)} positional arguments, the README passes {n_pos}"
    bad = [kw.arg for kw in tree.keywords if kw.arg not in names and not varkw]
    if bad:
        return f"has no parameter {bad} (it has {sorted(names)})"
    return None


@pytest.mark.parametrize("call", _documented_calls())
def test_documented_call_signature(call):
    name, args = call.split("(", 1)
    tree = ast.parse(f"f({args[:-1]})", mode="eval").body
    why = [_binds(t, tree) for t in _resolve(name)]
    assert None in why, f"README documents {call!r}, but {name}: {'; '.join(why)}"


# ----------------------------------------------------------------------------- command line


def _cli_flags(section: str) -> set[str]:
    start = README.index(section)
    end = README.index("\n## ", start + 1)
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", README[start:end]))


def test_documented_cli_options_exist(capsys):
    from dgl_fast import cli  # noqa: PLC0415  (in this process: `python -m dgl_fast` is test_state_and_cli's)

    flags = _cli_flags("## Command line")
    helps = ""
    for cmd in (["train", "--help"], ["bench", "--help"], ["check", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(cmd)
        assert exit_.value.code == 0, capsys.readouterr().err
        helps += capsys.readouterr().out
    # torchrun's own options appear in the launch examples
    torchrun = {"--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--max-restarts"}
    missing = sorted(f for f in flags - torchrun if f not in helps)
    assert not missing, f"README's command line section names options the CLI does not have: {missing}"
