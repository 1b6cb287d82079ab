"""Benchmarks, importable from an installed package: ``python -m dgl_fast bench NAME [args]`` runs
``dgl_fast.bench.NAME.main(args)`` (also ``python -m dgl_fast.bench.NAME``). Each writes
``<name>-<device>.json`` and ``.md`` under ``--out-dir`` (default ``benchmarks/results`` in the
current directory); ``common`` holds the shared helpers, ``authors_async`` the authors' async DGL
that ``bench replay_buffer`` compares against."""

from __future__ import annotations

import importlib

NAMES = ("accuracy", "aux_head", "memory", "overlap", "replay_buffer", "rules", "scaling", "step")


def run(name: str, argv: list[str]) -> int:
    """Run benchmark ``name`` with ``argv``: its exit status (2 for a bad option)."""
    if name not in NAMES:
        raise ValueError(f"no benchmark {name!r}; expected one of {', '.join(NAMES)}")
    try:
        return importlib.import_module(f"{__name__}.{name}").main(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or a bad option (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
