"""CUDA graphs of stage steps: torch's SGD step in capturable form, and the one capture routine
both graph paths (pipelined and asynchronous) use. With ``emulate=True`` the "graph" keeps the
captured function and its static tensors and replays by calling it: the graph paths' data flow
runs on any device (CI tests it on the CPU), under the capture-safety watch
(:mod:`dgl_fast.schedules.capture_safety`): what a real capture would refuse or record wrongly is
refused with a :class:`~dgl_fast.schedules.capture_safety.CaptureUnsafeError`."""

from __future__ import annotations

import torch

from .capture_safety import CaptureUnsafeError, CaptureWatch

__all__ = ["GraphSGD", "EmulatedGraph", "capture", "CaptureWatch", "CaptureUnsafeError"]


class GraphSGD:
    """A CUDA-graph-capturable step of a ``torch.optim.SGD``, bitwise equal to torch's own.

    It runs the foreach ops of torch's multi-tensor SGD (weight decay, momentum, dampening,
    Nesterov; the same ops, in the same order, as torch's single-tensor SGD on the CPU) on the
    optimizer's own parameters and momentum buffers (which must exist: take one eager step first),
    so a replayed graph produces exactly the parameters of eager ``opt.step()`` calls. Like torch's
    SGD it passes the learning rate to the kernels as a number: a captured graph keeps the rate it
    was captured with. :meth:`stale` tells when the optimizer's rate has changed since; the engines
    then capture the stage step again (once per learning-rate change, not per step).
    """

    def __init__(self, opt: torch.optim.Optimizer):
        if type(opt) is not torch.optim.SGD:
            raise ValueError(f"CUDA graphs capture torch.optim.SGD steps; got {type(opt).__name__} "
                             "(use cuda_graphs=False for other optimizers)")
        for g in opt.param_groups:
            if g.get("maximize", False):
                raise ValueError("GraphSGD does not support maximize=True")
        self.opt = opt
        #: the learning rate of each parameter group, as captured
        self.lr = [float(g["lr"]) for g in opt.param_groups]

    def stale(self) -> bool:
        """Whether the optimizer's learning rates differ from the captured ones."""
        return any(float(g["lr"]) != lr for g, lr in zip(self.opt.param_groups, self.lr))

    @torch.no_grad()
    def step(self) -> None:
        for lr, g in zip(self.lr, self.opt.param_groups):
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, mom, damp, nesterov = g["weight_decay"], g["momentum"], g["dampening"], g["nesterov"]
            if wd != 0:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if mom != 0:
                bufs = []
                for p in params:
                    buf = self.opt.state[p].get("momentum_buffer")
                    if buf is None:
                        raise RuntimeError("GraphSGD needs momentum buffers: run one eager optimizer step first")
                    bufs.append(buf)
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, grads, alpha=1 - damp)
                grads = torch._foreach_add(grads, bufs, alpha=mom) if nesterov else bufs
            torch._foreach_add_(params, grads, alpha=-lr)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none``): inside a graph whose capture started without
        gradients, each replay's backward writes them afresh, so no fill is needed."""
        for g in self.opt.param_groups:
            for p in g["params"]:
                p.grad = None


class EmulatedGraph:
    """Stands in for a captured CUDA graph: replay calls the stage-step function on the same static
    tensors a real capture would have recorded, under ``watch`` (a
    :class:`~dgl_fast.schedules.capture_safety.CaptureWatch`, whose storage snapshot is taken here,
    at capture): the storage is verified before each replay and every op of the step is checked.
    ``pool``: the memory-pool token the real capture would have shared (kept for inspection)."""

    def __init__(self, fn, *args, pool=None, watch: CaptureWatch | None = None):
        self.fn, self.args, self.pool = fn, args, pool
        self.watch = watch if watch is not None else CaptureWatch(None, torch.device("cpu"))
        self.watch.snapshot()

    def replay(self) -> None:
        watch = self.watch
        watch.verify("between capture and replay")
        with torch.enable_grad(), watch.region():
            self.fn(*self.args)


def capture(fn, *args, device: torch.device, stream=None, emulate: bool = False, pool=None,
            watch: CaptureWatch | None = None):
    """Capture ``fn(*args)`` into a CUDA graph on ``stream`` (a side stream ordered after the
    current one, which waits for the capture in turn); emulated: keep the call for replay, under
    ``watch`` (default: a watch of no stage on ``device``, checking the ops only).

    ``pool``: a memory-pool token (``torch.cuda.graph_pool_handle()``, or any object when
    emulated) shared with other graphs that never replay concurrently with this one; pass the
    same ``stream`` to every capture that shares a pool (torch's advice for effective sharing)."""
    if emulate:
        return EmulatedGraph(fn, *args, pool=pool, watch=watch if watch is not None else CaptureWatch(None, device))
    g = torch.cuda.CUDAGraph()
    cur = torch.cuda.current_stream(device)
    stream = stream if stream is not None else torch.cuda.Stream(device)
    stream.wait_stream(cur)
    with torch.cuda.device(device), torch.cuda.graph(g, pool=pool, stream=stream):
        fn(*args)
    cur.wait_stream(stream)
    return g
