"""The step guard: a stage step whose loss or gradients are not finite never reaches the weights.

As ``torch.amp.GradScaler`` skips a step, the decision stays on the device (no host
synchronisation, so it also runs inside CUDA graphs): the optimizer's own step runs unchanged, then
a 0-dim flag ``bad = ~isfinite(loss) | any non-finite gradient`` (torch's multi-tensor amp check,
one kernel per device and dtype, on the gradients as the backward and the step's pre-hooks left
them: replicas that average gradients there, as DDP does in the backward, decide alike) selects
back every tensor the step may have changed with ``torch.where(bad, old, new)``. This works for any
``torch.optim`` optimizer (and for :class:`~dgl_fast.schedules.GraphSGD`), and a finite step is bitwise the optimizer's own.

What a skipped step leaves exactly as it was: the parameters that had gradients, their optimizer
state tensors (momentum buffers, Adam's moments and step count; weight decay and momentum cannot
move a parameter either, since the whole update is undone) and the buffers of the step's modules
(BatchNorm running statistics and batch counts, written by the forward). State an optimizer
creates at its first step is zeroed when that step is skipped (torch's initial value for Adam's
moments; for SGD a zero momentum buffer, which trains as a fresh one unless ``dampening`` is set).
Non-tensor state (Python numbers) is not restored. The step's output still leaves it (the next
stage's loss is then not finite and that stage skips too); in async mode such an output pushed
into a replay buffer makes every step that samples it skip until it is overwritten.

On the CPU, where reading a flag synchronises nothing, :meth:`StepGuard.step` takes the host
branch (``StepGuard.host_branch``): the flag is computed in an optimizer step pre-hook registered
for that step after every other (so it reads the gradients the step would use) and, where set,
the step is not run at all; nothing is copied but the modules' buffers. A finite step is the
optimizer's own either way, and a skipped one leaves the same values (state that its first step
would create is simply not created). It cost a doubling of a VGG-13 step on one CPU thread to copy
and select back 70 M parameter and momentum values (1368 ms against 871 ms without the guard).

Cost on devices: a copy of those tensors per step (memory: one stage's parameters and optimizer state, for
the time of its step) and one ``where`` per tensor. An optimizer that keeps state tensors on
another device (Adam's step count on the host when the parameters are on a GPU, unless
``capturable=True``) costs a host read of the flag for those tensors.
"""

from __future__ import annotations

import torch

__all__ = ["nonfinite", "StepGuard"]


def nonfinite(loss: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """0-dim bool tensor on ``loss``'s device: whether ``loss`` or any of ``grads`` holds a NaN or an
    infinity. The gradients are left unchanged (torch's amp check multiplies them by 1)."""
    bad = ~torch.isfinite(loss.detach())
    groups: dict = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g)
    for (dev, _), gs in groups.items():
        found = torch.zeros((), dtype=torch.float32, device=dev)
        torch._amp_foreach_non_finite_check_and_unscale_(gs, found, torch.ones((), dtype=torch.float32, device=dev))
        bad = bad | (found.to(bad.device, non_blocking=True) > 0)
    return bad


def _copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors] if tensors else []


def _on(flag: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return flag if flag.device == t.device else flag.to(t.device)


class StepGuard:
    """Guards the steps of an optimizer over ``modules`` (whose buffers the forward updates).

    Call :meth:`begin` before the forward (it copies the modules' buffers) and :meth:`step` in
    place of the optimizer's step: it returns the device flag ``bad`` and leaves the parameters,
    optimizer state and module buffers as they were before :meth:`begin` where ``bad`` is set."""

    #: where every tensor of a step is on the CPU: read the flag on the host and skip the step
    #: instead of copying and selecting back (False: the device branch everywhere, as on CUDA)
    host_branch = True

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = list(modules)

    def begin(self) -> tuple[list, list]:
        """Snapshot of the modules' buffers, before the forward that may update them."""
        bufs = [b for m in self.modules for b in m.buffers()]
        return bufs, _copy(bufs)

    @torch.no_grad()
    def step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, run, begun: tuple[list, list],
             host: bool = False) -> torch.Tensor:
        """Run ``run()`` (``opt``'s step, or a scaler's or :class:`GraphSGD`'s step of ``opt``)
        after the backward of ``loss``; undo it, and the forward's buffer updates, on the device
        where the loss or a gradient is not finite. Returns the 0-dim bool flag (True: skipped).
        ``host``: ``run`` is ``opt.step`` itself, which the host branch may then skip."""
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        on_cpu = loss.device.type == "cpu" and all(p.device.type == "cpu" for p in params)
        if host and self.host_branch and isinstance(opt, torch.optim.Optimizer) and on_cpu:
            return self._host_step(opt, loss, run, begun, params)
        keys = [(p, k) for p in params for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)]
        old = _copy(params + [opt.state[p][k] for p, k in keys])
        run()
        # the gradients as the step used them: after the backward (the distributed runner's DDP
        # averages the replicas' gradients inside it) and the step's pre-hooks, so every replica
        # decides alike; torch's optimizers never write them
        bad = nonfinite(loss, [p.grad for p in params])
        had = {(id(p), k) for p, k in keys}
        for p in params:
            for k, v in opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and (id(p), k) not in had:  # made by this step: zero where skipped
                    v.masked_fill_(_on(bad, v), 0)
        bufs, old_bufs = begun
        for new, prev in zip(params + [opt.state[p][k] for p, k in keys] + bufs, old + old_bufs):
            torch.where(_on(bad, new), prev, new, out=new)
        return bad

    def _host_step(self, opt, loss, run, begun, params) -> torch.Tensor:
        """The CPU's branch: the flag from a pre-hook that runs after every other pre-hook of the
        step; where it is set the hook stops the step before it changes anything."""
        flag = []

        def check(_opt, args, kwargs):
            flag.append(nonfinite(loss, [p.grad for p in params]))
            if flag[0].item():
                raise _Skipped

        handle = opt.register_step_pre_hook(check)
        try:
            run()
        except _Skipped:
            bufs, old_bufs = begun
            for new, prev in zip(bufs, old_bufs):
                new.copy_(prev)
        finally:
            handle.remove()
        if not flag:  # never silent: a step that bypassed its pre-hooks could not be guarded
            raise RuntimeError(f"{type(opt).__name__}.step ran without its step pre-hooks: the step guard could not "
                               "check it (StepGuard.host_branch = False guards it on the device)")
        return flag[0]


class _Skipped(Exception):
    """Raised by the host branch's pre-hook: the step does not run."""
